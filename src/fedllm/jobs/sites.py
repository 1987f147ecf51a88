"""The federation a job is created for: its sites, from the site config, and what a job asks of them.

`fedllm job create` finds the site config as every command does (`-c`, else the config last provisioned
into the workspace, else site_configs/default.yaml). Where there is none (the admin container holds its
kit only), the job is created for the template's number of sites and says what went unchecked.
Each check looks at one site, so per-site settings are checked the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedllm.config.site_config import Site, SiteConfig
from fedllm.jobs.compression import QUANTIZATIONS
from fedllm.jobs.errors import JobSpecError


@dataclass(frozen=True)
class Federation:
    """A site config and the file it came from (named in messages)."""

    config: SiteConfig
    source: str

    @property
    def site_names(self) -> list[str]:
        return self.config.site_names

    def check_site_count(self, num_clients: int) -> None:
        """A job waits for `num_clients` sites: more than the federation has can never be scheduled."""
        names = self.site_names
        if num_clients > len(names):
            raise JobSpecError(
                f"--num-clients {num_clients}: the site config {self.source} has {len(names)} site(s) "
                f"({', '.join(names)}), so the job could never start. Fix: --num-clients {len(names)} or fewer, "
                "or add sites to the site config (and provision again)"
            )

    def check_compression(self, compression: str, site_names: list[str]) -> None:
        """8-/4-bit quantization runs on CUDA on every participant: each of `site_names` must have GPUs."""
        if compression not in QUANTIZATIONS:
            return
        without = [name for name in site_names if not can_quantize(self.config.site(name))]
        if without:
            raise JobSpecError(
                f"--compress {compression}: NVFlare's ModelQuantizer/ModelDequantizer run on a CUDA GPU on every "
                f"participant, but {', '.join(without)} list(s) no gpus in the site config {self.source}. "
                "Fix: --compress fp16 or bf16 (they run on CPU), or give those sites GPUs"
            )


def can_quantize(site: Site) -> bool:
    """Whether `site` can run the 8-/4-bit quantization filters as far as the site config tells: it has GPUs."""
    return bool(site.gpus)


def unchecked_quantization_note(compression: str) -> str | None:
    """What the site config cannot tell about a quantization job: said at creation, never left silent."""
    if compression not in QUANTIZATIONS:
        return None
    return (
        f"--compress {compression} also needs bitsandbytes on every participant and a CUDA GPU on the server "
        "(it quantizes the global model it sends); the site config does not say, so this was not checked. "
        "The compose server has no GPU: run the server natively on a GPU host, or use --compress fp16/bf16"
    )
