"""`--lora-ranks site-1:16,site-2:8,site-3:4`: one hf-lora FedAvg job whose sites train LoRA adapters of their own rank.

HetLoRA's zero-padding (fedllm.training.hf.hetlora does the sites' half): the server holds the
global adapter at the largest rank r_max (the job's lora_r) and averages the sites' zero-padded
adapters with FedAvg, unchanged; each site trains the first r_k rank components (its own lora_r).

One LoRA scaling on every site: PEFT scales an adapter by lora_alpha / r, so each site gets
lora_alpha = s × r_k and the server's adapter s × r_max, where s is the job's lora_alpha / lora_r.
A truncated global adapter then means the same ΔW on every site (its first r_k components, each
scaled by s), and the sites' updates add up in one space.
"""

from __future__ import annotations

import re
from typing import Any

from fedllm.jobs.errors import JobSpecError

OPTION = "--lora-ranks"
EXAMPLE = "site-1:16,site-2:8,site-3:4"
_SITE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def parse_lora_ranks(text: str) -> dict[str, int]:
    """{site: rank} from "site-1:16,site-2:8"; a JobSpecError names the bad part and the fix."""
    ranks: dict[str, int] = {}
    parts = [part.strip() for part in text.split(",")]
    if not text.strip() or not any(parts):
        raise JobSpecError(f"{OPTION} is empty. Fix: give each site's LoRA rank as SITE:RANK pairs, e.g. {EXAMPLE}")
    for part in parts:
        if not part:
            raise JobSpecError(
                f"{OPTION} {text!r} has an empty entry (two commas). Fix: SITE:RANK pairs, e.g. {EXAMPLE}"
            )
        site, colon, rank = (s.strip() for s in part.partition(":"))
        if not colon:
            raise JobSpecError(f"{OPTION}: {part!r} has no ':'. Fix: write SITE:RANK, e.g. {EXAMPLE}")
        if not _SITE.match(site):
            raise JobSpecError(
                f"{OPTION}: {part!r} names no site before ':'. Fix: the site's name as in the site config, e.g. {EXAMPLE}"
            )
        if not rank.isdigit() or int(rank) < 1:
            raise JobSpecError(
                f"{OPTION}: {part!r}: the rank {rank!r} is not a whole number of at least 1. Fix: e.g. {site}:8"
            )
        if site in ranks:
            raise JobSpecError(f"{OPTION} gives {site} twice ({site}:{ranks[site]} and {part}). Fix: one rank per site")
        ranks[site] = int(rank)
    return ranks


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def lora_rank_overrides(ranks: dict[str, int], job_args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict]]:
    """(job-level trainer-argument changes, {site: its own trainer arguments}) for per-site LoRA ranks.

    `job_args` are the job's trainer arguments (the template's, with -a values): their lora_alpha / lora_r
    is the scaling every site keeps. The job level gets lora_r = the largest rank (the server's global
    adapter; what a site without its own rank trains) and the matching lora_alpha.
    """
    if not ranks:
        raise JobSpecError(f"{OPTION} names no site. Fix: give each site's LoRA rank, e.g. {EXAMPLE}")
    if "lora_r" not in job_args or "lora_alpha" not in job_args:
        raise JobSpecError(
            f"{OPTION} sets each site's LoRA rank, but this job's trainer has no lora_r/lora_alpha arguments. "
            "Fix: use it with a LoRA template (hf-lora), or drop it"
        )
    try:
        r, alpha = int(job_args["lora_r"]), float(job_args["lora_alpha"])
    except (TypeError, ValueError):
        raise JobSpecError(
            f"{OPTION}: the job's lora_r={job_args['lora_r']!r} and lora_alpha={job_args['lora_alpha']!r} must be "
            "numbers. Fix: -a lora_r=8 -a lora_alpha=16"
        ) from None
    if r < 1:
        raise JobSpecError(f"{OPTION}: the job's lora_r is {r}; it must be at least 1. Fix: -a lora_r=8")
    scale = alpha / r
    top = max(ranks.values())
    job = {"lora_r": top, "lora_alpha": _number(scale * top)}
    sites = {site: {"lora_r": rank, "lora_alpha": _number(scale * rank)} for site, rank in ranks.items()}
    return job, sites
