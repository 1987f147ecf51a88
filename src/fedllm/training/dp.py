"""Record-level differential privacy (DP-SGD) at a site, and the (ε, δ) it spends: one accountant for the job.

What is protected is one training record of one site: every optimizer step draws its batch by Poisson sampling
(each record independently with probability q, the sampled Gaussian mechanism the accountant assumes), clips each
record's gradient to L2 norm C, and adds Gaussian noise of standard deviation σ·C to the sum (Opacus' per-sample
gradient hooks and `DPOptimizer`). Opacus' RDP accountant composes every step of every round into the ε the site
has spent at the job's δ.

Why every site's schedule is the same: q is job-wide (a site's expected batch is q × its records) and a round is
`ceil(local_epochs / q)` steps whatever the batch draws, so every site spends the same ε per round. `fedllm job
create` can therefore calibrate σ for the whole job, print ε after each round, refuse a job whose first round
already exceeds the budget, and tell the server after which round the budget ends (the job stops there with its
global model). The site's own `PrivacyLedger`, kept per job lineage beside the trainer state
(fedllm.training.lineage), is the backstop: ε goes on across a server or site restart, and a site refuses a
round that would take it past the budget.

An empty Poisson batch is a step all the same (noise only): the accountant counts every step the sampler draws.
Under DP a site reports no `train_loss` (it is computed on private records without noise) except in its own
TensorBoard.
"""

from __future__ import annotations

import json
import math
import secrets
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedllm.errors import FedllmError
from fedllm.fileio import write_text

ACCOUNTANTS = ("rdp",)
DEFAULT_DELTA = 1e-5  # below 1/records for any site of up to 100,000 records (the usual rule: δ ≪ 1/n)
DEFAULT_CLIP = 1.0
DEFAULT_SAMPLE_RATE = 0.05  # expected batch 15 of a 300-record site (the demo's), ≈ its batch of 16
LEDGER_NAME = "dp-ledger.json"
LEDGER_FORMAT = 1
STOPPED_META = "fedllm_dp_stopped"  # a site that refused a round over its budget says so in its (empty) result
METRIC_NAMES = ("dp_epsilon", "dp_delta", "dp_noise_multiplier", "dp_sample_rate", "dp_steps_total")
# The keys of `--dp` and what they set (the short names are what a person types).
KEYS = {
    "epsilon": "epsilon",
    "delta": "delta",
    "noise": "noise_multiplier",
    "clip": "max_grad_norm",
    "sample_rate": "sample_rate",
    "accountant": "accountant",
}
GRAMMAR = "--dp epsilon=E[,delta=D][,noise=SIGMA][,clip=C][,sample_rate=Q], e.g. --dp epsilon=8,delta=1e-5"


class DPError(FedllmError):
    """DP settings that cannot work, a ledger that cannot be trusted, or a round over the budget."""


@dataclass(frozen=True)
class DPSettings:
    """The job's DP-SGD settings: the same at every site (they travel as the trainer argument `--dp`)."""

    delta: float
    noise_multiplier: float  # σ: the noise's standard deviation in units of the clipping bound
    max_grad_norm: float  # C: each record's gradient is clipped to this L2 norm
    sample_rate: float  # q: each record is in a step's batch with this probability
    epsilon: float | None = None  # the job's budget; None: only reported
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        check_settings(self)

    def to_arg(self) -> str:
        """The trainer argument: every value exactly (repr of a float reads back as the same float)."""
        parts = [f"{short}={getattr(self, name)!r}" for short, name in KEYS.items() if getattr(self, name) is not None]
        return ",".join(p.replace("'", "") for p in parts)

    @classmethod
    def from_arg(cls, text: str) -> DPSettings:
        """A site's settings from its trainer argument (written by `fedllm job create`: σ is always there)."""
        values = parse_assignments(text)
        if "noise_multiplier" not in values:
            raise DPError(f"--dp {text!r}: no noise=SIGMA; create the job with `fedllm job create --dp ...`")
        return cls(**{"delta": DEFAULT_DELTA, "max_grad_norm": DEFAULT_CLIP, **values})  # type: ignore[arg-type]


def check_settings(settings: DPSettings) -> None:
    """Each value in its range, named with its fix."""
    s = settings
    if not 0 < s.delta < 1:
        raise DPError(f"--dp delta={s.delta}: δ is a probability in (0, 1), e.g. delta=1e-5 (below 1/records)")
    if not 0 < s.sample_rate <= 1:
        raise DPError(f"--dp sample_rate={s.sample_rate}: q is a probability in (0, 1], e.g. sample_rate=0.05")
    if not s.max_grad_norm > 0 or not math.isfinite(s.max_grad_norm):
        raise DPError(f"--dp clip={s.max_grad_norm}: the clipping bound is a positive number, e.g. clip=1.0")
    if not s.noise_multiplier > 0 or not math.isfinite(s.noise_multiplier):
        raise DPError(f"--dp noise={s.noise_multiplier}: σ is a positive number, e.g. noise=1.0 (or leave it out)")
    if s.epsilon is not None and (not s.epsilon > 0 or not math.isfinite(s.epsilon)):
        raise DPError(f"--dp epsilon={s.epsilon}: the budget ε is a positive number, e.g. epsilon=8")
    if s.accountant not in ACCOUNTANTS:
        raise DPError(f"--dp accountant={s.accountant}: fedllm accounts with {', '.join(ACCOUNTANTS)}")


def parse_assignments(text: str) -> dict[str, Any]:
    """`epsilon=8,delta=1e-5,...` as DPSettings fields; an unknown key or a value that is no number is refused."""
    values: dict[str, Any] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or key not in KEYS:
            raise DPError(f"--dp {text!r}: {item!r} is not KEY=VALUE with a key of {', '.join(KEYS)}. Use {GRAMMAR}")
        name = KEYS[key]
        if name in values:
            raise DPError(f"--dp {text!r}: {key} is given twice. Use {GRAMMAR}")
        if name == "accountant":
            values[name] = raw
            continue
        try:
            values[name] = float(raw)
        except ValueError:
            raise DPError(f"--dp {key}={raw!r}: not a number. Use {GRAMMAR}") from None
    return values


def steps_per_round(settings: DPSettings, local_epochs: float) -> int:
    """Optimizer steps in one round: `local_epochs` passes over the data in expectation, the same at every site."""
    return max(1, math.ceil(round(local_epochs / settings.sample_rate, 9)))


def _rdp_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Opacus' RDPAccountant over `history` [(σ, q, steps)], at its default orders."""
    import warnings

    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [tuple(h) for h in history if h[2] > 0]
    with warnings.catch_warnings():  # "optimal order is the largest alpha": ε is then an upper bound, still valid
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(accountant.get_epsilon(delta))


def epsilon_after(settings: DPSettings, steps: int) -> float:
    """ε at the job's δ after `steps` steps with the job's (σ, q) (Opacus' RDP accountant)."""
    if steps <= 0:
        return 0.0
    return _rdp_epsilon([(settings.noise_multiplier, settings.sample_rate, steps)], settings.delta)


def calibrate_noise(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """The smallest σ (to Opacus' search tolerance) whose ε after `steps` steps is at most `epsilon`."""
    import warnings

    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(
                get_noise_multiplier(
                    target_epsilon=epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=accountant,
                    epsilon_tolerance=0.001,
                )
            )
    except ValueError as exc:  # Opacus: "The privacy budget is too low." (σ beyond its search range)
        raise DPError(
            f"--dp epsilon={epsilon}: {exc} No σ reaches ε={epsilon} at δ={delta} in {steps} steps of q={sample_rate}."
            " Fix: a larger epsilon, a smaller sample_rate, or fewer rounds/epochs"
        ) from None


@dataclass(frozen=True)
class BudgetPlan:
    """ε after each round of a job, and the last round within the budget (`stop_round` rounds run)."""

    settings: DPSettings
    steps_per_round: int
    rounds: int
    epsilons: tuple[float, ...]  # ε after round 1, 2, ..., rounds

    @property
    def stop_round(self) -> int:
        """How many rounds stay within the budget (all of them without one)."""
        if self.settings.epsilon is None:
            return self.rounds
        return sum(1 for e in self.epsilons if e <= self.settings.epsilon)

    @property
    def epsilon_after_stop(self) -> float:
        return self.epsilons[self.stop_round - 1] if self.stop_round else 0.0


def plan_budget(settings: DPSettings, local_epochs: float, rounds: int) -> BudgetPlan:
    steps = steps_per_round(settings, local_epochs)
    return BudgetPlan(settings, steps, rounds, tuple(epsilon_after(settings, r * steps) for r in range(1, rounds + 1)))


@dataclass
class PrivacyLedger:
    """What one site has spent in one job lineage: the (σ, q, steps) of every round it trained, in order.

    Persisted as JSON with a CRC of its content, so a continuation job after a restart goes on from the ε the
    site had spent (a round redone after a restart costs its budget again: its update may have been seen).
    """

    history: list[tuple[float, float, int]] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)  # the round of each entry

    @property
    def steps_total(self) -> int:
        return sum(steps for _, _, steps in self.history)

    def record(self, settings: DPSettings, steps: int, round_: int = -1) -> None:
        self.history.append((float(settings.noise_multiplier), float(settings.sample_rate), int(steps)))
        self.rounds.append(int(round_))

    def epsilon(self, delta: float, more: tuple[DPSettings, int] | None = None) -> float:
        """ε at `delta` so far (with `more` = (settings, steps) not yet taken: what it would be after them)."""
        history = list(self.history)
        if more is not None:
            history.append((more[0].noise_multiplier, more[0].sample_rate, more[1]))
        if not any(steps > 0 for _, _, steps in history):
            return 0.0
        return _rdp_epsilon(history, delta)

    def _payload(self) -> dict[str, Any]:
        return {"format": LEDGER_FORMAT, "history": [list(h) for h in self.history], "rounds": list(self.rounds)}

    def save(self, path: Path) -> None:
        payload = self._payload()
        body = json.dumps(payload, sort_keys=True)
        record = {**payload, "crc32": zlib.crc32(body.encode())}
        write_text(path, json.dumps(record, indent=1) + "\n", durable=True)

    @classmethod
    def load(cls, path: Path) -> PrivacyLedger:
        """The ledger at `path`; an empty one where there is none yet. A damaged one is refused, never reset."""
        if not path.exists():
            return cls()
        fix = (
            "it is the record of the privacy this site spent; restore it from a backup, or (knowing that this "
            "forgets the spent budget) remove it"
        )
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            crc = record.pop("crc32")
            body = json.dumps(record, sort_keys=True)
            history = [(float(s), float(q), int(n)) for s, q, n in record["history"]]
            rounds = [int(r) for r in record["rounds"]]
            ok = (
                record.get("format") == LEDGER_FORMAT
                and crc == zlib.crc32(body.encode())
                and len(rounds) == len(history)
            )
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise DPError(f"privacy ledger {path} cannot be read ({exc}): {fix}") from None
        if not ok:
            raise DPError(f"privacy ledger {path} fails its check (format or CRC): {fix}")
        return cls(history, rounds)


def dp_metrics(ledger: PrivacyLedger, settings: DPSettings) -> dict[str, float]:
    """The DP numbers a site reports each round (they are about the sampling, never about a record)."""
    return {
        "dp_epsilon": ledger.epsilon(settings.delta),
        "dp_delta": float(settings.delta),
        "dp_noise_multiplier": float(settings.noise_multiplier),
        "dp_sample_rate": float(settings.sample_rate),
        "dp_steps_total": float(ledger.steps_total),
    }


@dataclass
class DPRoundOutcome:
    steps: int
    batch_sizes: list[int]
    mean_loss: float  # over the non-empty batches; stays in the site's own TensorBoard


def os_seeded_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded from the operating system's randomness: DP noise and sampling no one can replay."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def dp_round(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch_loss: Callable[[list[int]], torch.Tensor],
    *,
    num_records: int,
    settings: DPSettings,
    steps: int,
) -> DPRoundOutcome:
    """`steps` DP-SGD steps on `module`'s trainable parameters (on their device already: opacus#820).

    `batch_loss(indices)` returns the mean over those records of each record's own loss (a per-record loss, so one
    record's gradient is its own). The per-sample gradients come from Opacus' hooks on `module` (non-wrapping:
    the caller's module and state-dict keys stay as they are); `optimizer` is wrapped in `DPOptimizer` for the
    round. A step whose Poisson batch is empty adds noise only, and counts. The noise and the Poisson draws come
    from generators the operating system seeds (`os_seeded_generator`), never from the job's `--seed`: whoever
    knows the seed could otherwise replay the noise and subtract it, or tell which records a step used.
    """
    import warnings

    from opacus.grad_sample import GradSampleHooks
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    if num_records <= 0:
        raise DPError("DP-SGD needs training records: this site has none")
    module.train()  # Opacus validates train mode before it attaches
    trainable = [p for p in module.parameters() if p.requires_grad]
    hooks = GradSampleHooks(module, batch_first=True, loss_reduction="mean")
    noise_gen = os_seeded_generator(trainable[0].device)
    dp_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=settings.noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        expected_batch_size=max(1, round(settings.sample_rate * num_records)),
        loss_reduction="mean",
        generator=noise_gen,
    )
    sampler = UniformWithReplacementSampler(
        num_samples=num_records,
        sample_rate=settings.sample_rate,
        generator=os_seeded_generator(),
        steps=steps,
    )
    sizes: list[int] = []
    losses: list[float] = []
    try:
        with warnings.catch_warnings():
            # Hooks on a module whose inputs need no gradient (its first layer): torch warns; Opacus needs no more.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for indices in sampler:
                dp_optimizer.zero_grad(set_to_none=True)
                if indices:
                    loss = batch_loss(indices)
                    loss.backward()
                    losses.append(float(loss.detach()))
                else:  # noise only: zero per-sample gradients of a batch of none
                    for p in trainable:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                dp_optimizer.step()
                sizes.append(len(indices))
            dp_optimizer.zero_grad(set_to_none=True)
    finally:
        hooks.cleanup()
    return DPRoundOutcome(len(sizes), sizes, sum(losses) / len(losses) if losses else float("nan"))


class SiteBudget:
    """A site's DP state in fedllm's loop: the job's settings, its ledger on disk, the round's checks and numbers."""

    def __init__(self, settings: DPSettings, path: Path | None):
        """`path` None: a ledger in memory only (a unit test, a round run by hand)."""
        self.settings = settings
        self.path = path
        self.ledger = PrivacyLedger.load(path) if path is not None else PrivacyLedger()

    def would_exceed(self, steps: int) -> float | None:
        """ε after `steps` more steps if that exceeds the budget; None when the round may run."""
        if self.settings.epsilon is None:
            return None
        after = self.ledger.epsilon(self.settings.delta, (self.settings, steps))
        return after if after > self.settings.epsilon else None

    def spend(self, steps: int, round_: int) -> None:
        """Record a trained round, durably, before its update leaves the site."""
        self.ledger.record(self.settings, steps, round_)
        if self.path is not None:
            self.ledger.save(self.path)

    def metrics(self) -> dict[str, float]:
        return dp_metrics(self.ledger, self.settings)
