"""Secure aggregation for a job (`fedllm job create --secure-agg`): its settings, refusals and NVFlare wiring.

With it the server learns only the weighted sum of the sites' updates each round, never one site's
(fedllm.flare.secagg: Bonawitz et al. 2017, pairwise and self masks, Shamir shares of the mask seeds, in the
ring Z_2^32), and a round goes on as long as `threshold` sites stay. Settings:

threshold t     sites whose shares unmask a round; a round needs t updates. Default ⌊N/2⌋ + 1 of the N sites.
min_sites       sites that must be connected for the job to start (NVFlare's min_clients). Default t. The
                controller still sends each round to all N sites and waits for every one that stays.
clip C          each site clamps its update to [−C, C] per value before encoding (counted in `secagg_clamped`);
                the fixed-point scale follows from N and C (fedllm.flare.secagg.crypto). Default 1.0.

Refused at creation, each with the numbers and the fix: fewer than 3 sites (with 2, each site learns the
other's update from the aggregate), t outside 2..N, min_sites outside t..N (and N is at most the federation's
sites, fedllm.jobs.sites), compression of the sites' uplink (masked ring values cannot be cast or quantized), and
--mode local or central (no aggregate to hide).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fedllm.jobs.errors import JobSpecError

MIN_SITES = 3
TASKS = ["train"]


@dataclass(frozen=True)
class SecureAggregation:
    """A job's secure-aggregation settings (None: the default for the job's number of sites)."""

    threshold: int | None = None
    min_sites: int | None = None
    clip: float = 1.0
    # FedAvg weights above it count as it (inside the ring a weight is n_k / max_weight ≤ 1); a site says so.
    max_weight: float = 1000.0
    # Seconds the server waits for the sites' answers to each key-exchange and unmasking stage.
    stage_timeout_s: float = 60.0
    # Seconds a round still waits for the other sites once t masked updates are in (then goes on without them).
    wait_after_min_s: int = 600

    def dead_client_config(self) -> dict[str, float]:
        """NVFlare's dead-site timing for the job: a killed site is given up on soon, but after a stage timeout.

        A site whose job process died is declared gone after `dead_client_grace_period`; should the sites
        left fall below min_sites then, NVFlare ends the job. Longer than a stage's timeout, so that a round
        which can no longer reach t fails first with secure aggregation's own message (naming the sites and t).
        """
        return {
            "dead_client_grace_period": 2 * self.stage_timeout_s + 5,
            "dead_client_check_lead_time": self.stage_timeout_s,
        }

    def describe(self) -> str:
        return (
            f"secure aggregation: threshold t={self.threshold} (a round needs t sites' updates and shares), "
            f"the job starts with {self.min_sites} site(s) or more, each site clips its update to "
            f"±{self.clip:g} per value, FedAvg weights up to {self.max_weight:g}; the server learns only the sum"
        )


def default_threshold(num_sites: int) -> int:
    return num_sites // 2 + 1


def resolve_secure_agg(
    asked: SecureAggregation, num_sites: int, mode: str, compression: str, federation_sites: int | None
) -> SecureAggregation:
    """`asked` with its defaults filled in for a job of `num_sites`; JobSpecError if it cannot run."""
    if mode != "fedavg":
        raise JobSpecError(
            f"--secure-agg with --mode {mode}: there is no aggregate to hide (each site's model is its own result). "
            "Fix: drop --secure-agg, or use --mode fedavg"
        )
    if num_sites < MIN_SITES:
        where = f" (the site config has {federation_sites})" if federation_sites is not None else ""
        raise JobSpecError(
            f"--secure-agg needs at least {MIN_SITES} sites, and the job has {num_sites}{where}: with 2, each site "
            "learns the other's update from the aggregate (minus its own). Fix: --num-clients 3 or more (and a "
            "site config with that many sites)"
        )
    default = default_threshold(num_sites)
    threshold = default if asked.threshold is None else asked.threshold
    if not 2 <= threshold <= num_sites:
        raise JobSpecError(
            f"--secagg-threshold {threshold}: the threshold is between 2 and the job's {num_sites} sites (the sites "
            f"whose shares unmask a round). Fix: --secagg-threshold {default} (the default, ⌊N/2⌋+1) or another "
            f"value in 2..{num_sites}"
        )
    min_sites = threshold if asked.min_sites is None else asked.min_sites
    if min_sites < threshold:
        raise JobSpecError(
            f"--secagg-min-sites {min_sites} is below the threshold t={threshold}: the job could start with fewer "
            f"sites than any round needs. Fix: --secagg-min-sites {threshold} or more (at most {num_sites})"
        )
    if min_sites > num_sites:
        raise JobSpecError(
            f"--secagg-min-sites {min_sites}: more than the job's {num_sites} sites, so it could never start. "
            f"Fix: --secagg-min-sites {threshold}..{num_sites}"
        )
    if compression != "none":
        raise JobSpecError(
            f"--secure-agg with compression {compression} (--compress or the template's exchange.wire_dtype): "
            "a masked update is ring values (uint32) that a cast or quantization would destroy. Fix: drop "
            "--compress or wire_dtype (the masked update has the bytes of fp32)"
        )
    if not asked.clip > 0:
        raise JobSpecError(f"--secagg-clip {asked.clip:g}: a clip bound is > 0, e.g. --secagg-clip 1.0")
    if not asked.max_weight > 0:
        raise JobSpecError(
            f"--secagg-max-weight {asked.max_weight:g}: the largest FedAvg weight is > 0, e.g. --secagg-max-weight 1000"
        )
    return dataclasses.replace(asked, threshold=threshold, min_sites=min_sites)


def apply_secure_agg(recipe, settings: SecureAggregation) -> None:
    """Add secure aggregation's server config, site component and site filters to an NVFlare recipe.

    Call it after compression and before `apply_tensor_items`: the mask must be the site's last filter but
    `WireViews` (which leaves its numpy arrays alone).
    """
    from fedllm.flare.secagg.client import CLIENT_COMPONENT_ID, SecAggClient
    from fedllm.flare.secagg.filters import SecAggMask, SecAggRemember
    from fedllm.flare.secagg.server import SERVER_COMPONENT_ID, SecAggConfig

    recipe.add_server_component(
        SecAggConfig(
            threshold=settings.threshold,
            min_sites=settings.min_sites,
            clip=settings.clip,
            max_weight=settings.max_weight,
            stage_timeout_s=settings.stage_timeout_s,
            wait_after_min_s=settings.wait_after_min_s,
        ),
        SERVER_COMPONENT_ID,
    )
    recipe.add_client_component(
        SecAggClient(threshold=settings.threshold, clip=settings.clip, max_weight=settings.max_weight),
        CLIENT_COMPONENT_ID,
    )
    recipe.add_client_input_filter(SecAggRemember(), tasks=TASKS)
    recipe.add_client_output_filter(SecAggMask(), tasks=TASKS)
    recipe.add_server_config(settings.dead_client_config())
