"""Each site's share of a job, from the GPUs its site config lists: processes, batch, precision, rank.

A federation is never uniform: one site has a pair of 80 GB GPUs, another one card. The site config
says which GPUs each site has, so it drives the job: a torchrun site trains one process per GPU it
lists (one process where it lists none: a CPU site), unless `--devices` or `--site NAME:devices=N`
says otherwise, and never on more GPUs than it lists.

The job keeps ONE effective batch (examples per optimizer step) on every site, so FedAvg's weighting
and the learning dynamics do not depend on which site has what. For the Hugging Face trainers it is
the job's `batch_size × grad_accum × devices` as the template and `-a`/`--devices` state them; each
site gets the gradient accumulation that keeps it with its own process count and micro-batch
(`--site NAME:micro_batch=M`). NeMo keeps `global_batch_size` itself (its accumulation is
global / (micro × data-parallel)); a NeMo site trains one tensor-parallel group of `devices` GPUs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from fedllm.jobs.errors import JobSpecError
from fedllm.jobs.sites import Federation
from fedllm.jobs.template import JobTemplate
from fedllm.jobs.trainer_args import TrainerArguments

# --fit: "batch" halves a site's micro-batch until its estimate fits; "auto" may also turn on gradient
# checkpointing and (LoRA) a 4-bit base; "off" estimates and shows, but changes and refuses nothing.
FIT_MODES = ("batch", "auto", "off")
MEMORY_MARGIN = 0.1  # of a GPU's memory kept free of the estimate: its error and what it does not model
# What `--site NAME:KEY=VALUE` calls a site's micro-batch, whatever the trainer names it.
MICRO_BATCH = "micro_batch"
EVERY_SITE = "(every site)"  # the plan's one row where no site config is known


@dataclass(frozen=True)
class BatchKeys:
    """How a trainer names its batch: per-process micro-batch, accumulation, and NeMo's global batch."""

    micro: str
    accumulation: str | None = None
    global_batch: str | None = None

    @staticmethod
    def of(trainer: TrainerArguments | None) -> BatchKeys | None:
        if trainer is None:
            return None
        if trainer.takes("global_batch_size") and trainer.takes("micro_batch_size"):
            return BatchKeys("micro_batch_size", global_batch="global_batch_size")
        if trainer.takes("batch_size"):
            return BatchKeys("batch_size", "grad_accum" if trainer.takes("grad_accum") else None)
        return None


@dataclass(frozen=True)
class SitePlan:
    """What one site runs: shown before the job is written, and rendered into the site's arguments."""

    site: str
    gpus: tuple[int, ...]
    processes: int
    micro_batch: int | None
    accumulation: int | None
    effective_batch: int | None
    precision: str
    quantize: str
    lora_r: int | None
    note: str = ""
    # Data-parallel replicas: the processes of a Hugging Face site; 1 for a NeMo site (its processes are
    # one tensor-parallel group that trains one replica).
    replicas: int = 1
    # The memory estimate per GPU (fedllm.jobs.memory), against the site's gpu_memory_gib where it states one.
    memory: str = "?"

    @property
    def batch(self) -> str:
        """'micro × accumulation × replicas = effective' (or what is known of it)."""
        if self.micro_batch is None or self.effective_batch is None:
            return "?"
        if self.accumulation is None:
            return f"{self.micro_batch} × {self.replicas} = {self.effective_batch}"
        return f"{self.micro_batch} × {self.accumulation} × {self.replicas} = {self.effective_batch}"


@dataclass(frozen=True)
class JobPlan:
    """Every site's plan, and the per-site trainer arguments that make the job do it."""

    sites: tuple[SitePlan, ...]
    site_args: dict[str, dict[str, Any]]
    effective_batch: int | None

    def table(self) -> list[tuple[str, ...]]:
        """The plan as rows of text, a header first (what `fedllm job create` prints)."""
        show_rank = any(p.lora_r is not None for p in self.sites)
        header = ("site", "GPUs", "processes", "micro × accum × replicas = batch", "precision", "quantize", "GiB/GPU")
        rows = [header + (("LoRA r",) if show_rank else ())]
        for p in self.sites:
            gpus = ",".join(map(str, p.gpus)) if p.gpus else "none (CPU)"
            row = (p.site, gpus, str(p.processes), p.batch, p.precision, p.quantize, p.memory)
            rows.append(row + ((str(p.lora_r) if p.lora_r is not None else "-",) if show_rank else ()))
        return rows


def plan_job(
    template: JobTemplate,
    trainer: TrainerArguments | None,
    job_args: Mapping[str, Any],
    site_args: Mapping[str, Mapping[str, Any]],
    federation: Federation | None,
    devices: int | None,
    fit_mode: str = "batch",
) -> JobPlan:
    """Plan every site of `federation` (one row for every site where none is known).

    `job_args` are the job's trainer arguments as the trainer parses them (its defaults included),
    `site_args` the per-site overrides (typed as the trainer parses them), `devices`
    the job's --devices when given. Raises JobSpecError naming the site and the fix when a site cannot
    run its share.

    Memory (fedllm.jobs.memory): where the model is readable here and a site states `gpu_memory_gib`,
    the site's micro-batch is the largest (halving) whose estimate fits its GPUs with a 10% margin, its
    accumulation raised to keep the job's batch; `fit_mode="auto"` may also turn on gradient
    checkpointing, then (LoRA) a 4-bit base. A site that cannot fit at all is refused, naming the need.
    """
    if fit_mode not in FIT_MODES:
        raise JobSpecError(f"--fit {fit_mode!r}: use one of {', '.join(FIT_MODES)}")
    keys = BatchKeys.of(trainer)
    torchrun = template.launch == "torchrun"
    job_devices = int(devices or job_args.get("devices") or template.defaults.devices)
    target = _effective_batch(keys, job_args, job_devices)
    names = federation.site_names if federation is not None else [EVERY_SITE]
    plans, rendered = [], {}
    for name in names:
        own = dict(site_args.get(name, {}))
        site = federation.config.site(name) if federation is not None else None
        gpus = tuple(site.gpus) if site is not None else ()
        args = {**job_args, **own}
        processes = _processes(name, own, gpus, devices, job_devices, torchrun, keys, federation)
        plan, changes = _site_plan(name, gpus, processes, own, args, keys, target, template)
        if site is not None and trainer is not None:
            plan = _fit_memory(
                plan, changes, {**args, **changes}, keys, site.gpu_memory_gib, trainer.module, template.name, fit_mode
            )
        plans.append(plan)
        if federation is not None:
            if torchrun:
                changes["devices"] = processes
            rendered[name] = {**own, **changes}
    return JobPlan(tuple(plans), {n: a for n, a in rendered.items() if a}, target)


def _effective_batch(keys: BatchKeys | None, args: Mapping[str, Any], devices: int) -> int | None:
    if keys is None:
        return None
    if keys.global_batch is not None:
        return int(args[keys.global_batch])
    accumulation = int(args[keys.accumulation]) if keys.accumulation else 1
    return int(args[keys.micro]) * accumulation * (devices if keys.accumulation else 1)


def _processes(
    name: str,
    own: Mapping[str, Any],
    gpus: tuple[int, ...],
    devices: int | None,
    job_devices: int,
    torchrun: bool,
    keys: BatchKeys | None,
    federation: Federation | None,
) -> int:
    """The site's process count: its own devices, else --devices, else (HF torchrun) one per listed GPU."""
    if "devices" in own:
        count, option = int(own["devices"]), f"--site {name}:devices={own['devices']}"
    elif devices is not None:
        count, option = devices, f"--devices {devices}"
    elif torchrun and keys is not None and keys.global_batch is None:
        return max(1, len(gpus))  # Hugging Face under torchrun: every GPU the site lists
    elif torchrun:  # NeMo: one tensor-parallel group of the job's devices (the checkpoint's TP)
        count, option = job_devices, None
    else:
        return 1  # the trainer runs in the site's job process
    if gpus and count > len(gpus):
        source = federation.source if federation is not None else "the site config"
        if option is None:  # NeMo's TP: the site cannot take fewer processes
            raise JobSpecError(
                f"{name} lists {len(gpus)} GPU(s) ({', '.join(map(str, gpus))}) in {source}; the job trains "
                f"tensor parallel {count} (its devices: the checkpoint's TP), one process per GPU. Fix: give {name} {count} GPUs in the site "
                f"config (and provision again); for p-tuning (only the prompt encoder is exchanged), --site "
                f"{name}:devices={len(gpus)} --site {name}:model=<a copy resharded to TP {len(gpus)} by `fedllm ckpt "
                "convert`>"
            )
        raise JobSpecError(
            f"{option}: {name} lists {len(gpus)} GPU(s) ({', '.join(map(str, gpus))}) in {source}, so "
            f"{count} processes would share them. Fix: --site {name}:devices={len(gpus)}, or give {name} more "
            "GPUs in the site config and provision again"
        )
    return count


def _site_plan(
    name: str,
    gpus: tuple[int, ...],
    processes: int,
    own: Mapping[str, Any],
    args: Mapping[str, Any],
    keys: BatchKeys | None,
    target: int | None,
    template: JobTemplate,
) -> tuple[SitePlan, dict[str, Any]]:
    changes: dict[str, Any] = {}
    micro = accumulation = effective = None
    note = ""
    replicas = processes
    if keys is not None and target is not None:
        micro = int(args[keys.micro])
        if keys.global_batch is not None:  # NeMo: accumulation = global / (micro × data parallel); DP = 1 here
            if target % micro:
                raise JobSpecError(
                    f"{name}: micro-batch {micro} does not divide the job's global batch {target} (NeMo needs it "
                    f"to). Fix: --site {name}:{MICRO_BATCH}=M with M dividing {target}"
                )
            accumulation, effective, replicas = target // micro, target, 1
        elif keys.accumulation is not None:
            micro, accumulation, note = _accumulation(name, processes, micro, target, keys, own)
            effective = micro * accumulation * processes
            if micro != int(args[keys.micro]):
                changes[keys.micro] = micro
            if accumulation != int(args[keys.accumulation]):
                changes[keys.accumulation] = accumulation
        else:
            effective = micro * processes
    precision = str(args.get("precision", "-"))
    if precision == "auto":
        precision = "auto (bf16/fp16)" if gpus else "fp32 (CPU)"
    quantize = str(args.get("quantize", "none"))
    if quantize not in ("none", "-") and not gpus and name != EVERY_SITE:
        raise JobSpecError(
            f"{name}: quantize={quantize} loads the frozen base in 4-bit with bitsandbytes on a CUDA GPU, and {name} "
            f"lists no GPUs. Fix: --site {name}:quantize=none, or give {name} GPUs in the site config"
        )
    lora_r = int(args["lora_r"]) if "lora_r" in template.train_args and "lora_r" in args else None
    plan = SitePlan(name, gpus, processes, micro, accumulation, effective, precision, quantize, lora_r, note, replicas)
    return plan, changes


def _fit_memory(
    plan: SitePlan,
    changes: dict[str, Any],
    args: Mapping[str, Any],
    keys: BatchKeys | None,
    gpu_gib: float | None,
    trainer: str,
    template: str,
    fit_mode: str,
) -> SitePlan:
    """The site's plan with the memory estimate, and (gpu_memory_gib stated) the micro-batch that fits."""
    from fedllm.jobs.memory import estimate, fit, model_size, workload_for

    if not plan.gpus or "model" not in args:
        return plan
    workload = workload_for(trainer, args, plan.processes)
    size = model_size(str(args["model"])) if workload is not None else None
    if workload is None or size is None:
        return plan
    if gpu_gib is None or fit_mode == "off":
        shown = f"~{estimate(size, workload).total:.1f}" + (f" of {gpu_gib:g}" if gpu_gib else "")
        return replace(plan, memory=shown)
    chosen = fit(
        size, workload, gpu_gib, margin=MEMORY_MARGIN, auto=fit_mode == "auto", site=plan.site,
        gpus=len(plan.gpus), template=template,
    )  # fmt: skip
    if chosen.problem is not None:
        raise JobSpecError(chosen.problem)
    memory = f"~{chosen.estimate.total:.1f} of {gpu_gib:g}"
    turned_on = []
    if chosen.checkpointing and not args.get("gradient_checkpointing"):
        changes["gradient_checkpointing"] = True
        turned_on.append("gradient checkpointing")
    if chosen.quantize != "none" and args.get("quantize", "none") == "none":
        changes["quantize"] = chosen.quantize
        turned_on.append(f"a {chosen.quantize} base (QLoRA)")
        plan = replace(plan, quantize=chosen.quantize)
    if turned_on:
        plan = replace(plan, note=f"--fit auto: {' and '.join(turned_on)} to fit {gpu_gib:g} GiB")
    if keys is None or plan.micro_batch is None or chosen.micro_batch >= plan.micro_batch:
        return replace(plan, memory=memory)
    share = (plan.effective_batch or 0) // (1 if keys.global_batch is not None else plan.replicas)
    micro = _largest_divisor(share, chosen.micro_batch)  # it must divide the site's share
    changes[keys.micro] = micro
    note = "; ".join(filter(None, [plan.note, f"micro-batch {plan.micro_batch} → {micro} to fit {gpu_gib:g} GiB"]))
    if keys.global_batch is not None:  # NeMo: global / micro
        accumulation = (plan.effective_batch or 0) // micro
    else:
        accumulation = (plan.effective_batch or 0) // (micro * plan.replicas)
        if keys.accumulation is not None:
            changes[keys.accumulation] = accumulation
    return replace(plan, micro_batch=micro, accumulation=accumulation, memory=memory, note=note)


def _accumulation(
    name: str, processes: int, micro: int, target: int, keys: BatchKeys, own: Mapping[str, Any]
) -> tuple[int, int, str]:
    """(micro-batch, accumulation, note) that make `target` examples per step on `processes` processes."""
    if keys.accumulation in own:
        raise JobSpecError(
            f"--site {name}:{keys.accumulation}=...: the job keeps one effective batch ({target}) on every site and "
            f"sets each site's accumulation to keep it. Fix: set --site {name}:{MICRO_BATCH}=M (or devices) instead"
        )
    if target % processes:
        raise JobSpecError(
            f"{name}: {processes} processes cannot share the job's effective batch of {target} evenly. Fix: "
            f"--site {name}:devices=N with N dividing {target}, or a batch_size/grad_accum whose product × devices "
            f"is a multiple of {processes}"
        )
    per_process = target // processes
    if per_process % micro == 0:
        return micro, per_process // micro, ""
    if keys.micro in own:
        raise JobSpecError(
            f"--site {name}:{MICRO_BATCH}={micro}: with {processes} process(es) each takes {per_process} examples "
            f"per step of the job's effective batch {target}, which {micro} does not divide. Fix: a micro-batch "
            f"dividing {per_process}"
        )
    smaller = _largest_divisor(per_process, micro)
    return smaller, per_process // smaller, f"micro-batch {micro} → {smaller}: {per_process} examples per process"


def _largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of `n` that is at most `at_most`: a micro-batch that splits a share evenly."""
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def parse_site_assignments(items: list[str], keys: BatchKeys | None) -> dict[str, dict[str, str]]:
    """`--site NAME:KEY=VALUE` items as {site: {trainer key: text}}; `micro_batch` is the trainer's micro key."""
    from fedllm.jobs.trainer_args import parse_assignments

    out: dict[str, dict[str, str]] = {}
    for item in items:
        site, sep, assignment = item.partition(":")
        if not sep or not site.strip() or "=" not in assignment:
            raise JobSpecError(f"--site {item!r} is not NAME:KEY=VALUE; write e.g. --site site-2:micro_batch=2")
        (key, value), *_ = parse_assignments([assignment], option=f"--site {site}:").items()
        if key == MICRO_BATCH:
            if keys is None:
                raise JobSpecError(
                    f"--site {item}: this template's trainer has no micro-batch argument fedllm knows. Fix: set the "
                    "trainer's own batch argument (`fedllm job args TEMPLATE` lists them)"
                )
            key = keys.micro
        out.setdefault(site.strip(), {})[key] = value
    return out
