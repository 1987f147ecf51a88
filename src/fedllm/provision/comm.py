"""Process-wide communication settings every fedllm kit gets (NVFlare's `local/comm_config.json`).

NVFlare reads these once per participant process (server, site and their job processes), from the
kit's `local/comm_config.json` or `NVFLARE_<KEY>` environment variables. fedllm sets them for
multi-GB model states; measurements in docs/exchange.md.
"""

from __future__ import annotations

from typing import Any

GiB = 2**30


def kit_comm_config() -> dict[str, Any]:
    """The comm_config.json written into every server and site kit by CommConfigBuilder."""
    return {
        # Job processes (server job, site job) connect to each other directly instead of relaying
        # every byte through the server and site parent processes: two fewer copies per chunk.
        "allow_adhoc_conns": True,
    }
