"""Secure aggregation (Bonawitz et al. 2017): the server learns the weighted sum of the sites' updates only.

``crypto`` holds the primitives, ``protocol`` the per-round state machines of a site and of the server.
Neither imports NVFlare; the wiring into NVFlare's messages and controller lives beside them.
"""

from fedllm.flare.secagg.protocol import SecAggError, SecAggParams, ServerSession, SiteSession, ThresholdError

__all__ = ["SecAggError", "SecAggParams", "ServerSession", "SiteSession", "ThresholdError"]
