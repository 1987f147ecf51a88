"""A tiny classifier on synthetic data: the smallest job that really trains through the federation.

Each site holds a label-skewed slice of a 3-class problem, so a site alone learns its own
classes and FedAvg learns all of them. Run by `fedllm demo` (job template `demo-mlp`):
    fedllm job create demo-mlp --mode fedavg --rounds 5 --out runs/jobs
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

FEATURES = 8
CLASSES = 3


class TinyClassifier(nn.Module):
    """Two linear layers; small enough that three sites train it in seconds on CPU."""

    def __init__(self, in_features: int = FEATURES, hidden: int = 32, classes: int = CLASSES):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @classmethod
    def from_state_dict(cls, state: dict) -> TinyClassifier:
        """Build the architecture the server's global weights describe (no duplicated sizes)."""
        w1, w2 = torch.as_tensor(state["net.0.weight"]), torch.as_tensor(state["net.2.weight"])
        model = cls(in_features=w1.shape[1], hidden=w1.shape[0], classes=w2.shape[0])
        model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
        return model


# ---- data ---------------------------------------------------------------------------------


def _sample(rng: np.random.Generator, centers: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return (centers[labels] + rng.normal(scale=1.6, size=(len(labels), centers.shape[1]))).astype(np.float32)


def write_demo_data(site_dirs: list[Path], val_path: Path, seed: int = 0, per_site: int = 300) -> None:
    """Write train.npz into every site dir and one balanced validation set shared by all.

    Site i gets mostly class i mod 3 (70%), the rest spread over the other classes: the
    label skew that makes local-only training worse than FedAvg. Every site gets its own
    copy of the validation set (val.npz), as a site sees only its own data directory.
    """
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=2.0, size=(CLASSES, FEATURES))
    for i, site_dir in enumerate(site_dirs):
        major = i % CLASSES
        probs = np.full(CLASSES, 0.3 / (CLASSES - 1))
        probs[major] = 0.7
        y = rng.choice(CLASSES, size=per_site, p=probs)
        site_dir.mkdir(parents=True, exist_ok=True)
        _save(site_dir / "train.npz", _sample(rng, centers, y), y)
    y = np.repeat(np.arange(CLASSES), 200)
    vx = _sample(rng, centers, y)
    for path in (val_path, *(d / "val.npz" for d in site_dirs)):
        path.parent.mkdir(parents=True, exist_ok=True)
        _save(path, vx, y)


def _save(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, x=x, y=y.astype(np.int64))
    tmp.replace(path)


def load_split(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(
            f"data file {path} not found; the site's data dir is {os.environ.get('FEDLLM_DATA_DIR')}"
        )
    with np.load(path) as data:
        return torch.from_numpy(data["x"]), torch.from_numpy(data["y"])


# ---- training ------------------------------------------------------------------------------


@dataclass
class Eval:
    loss: float
    accuracy: float


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Eval:
    model.eval()
    logits = model(x)
    return Eval(nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item())


def train_epochs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch: int, seed: int):
    """Plain SGD; returns (steps, mean training loss of the last epoch)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    steps, last = 0, 0.0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        losses = []
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())
            steps += 1
        last = float(np.mean(losses))
    return steps, last


def resolve_path(template: str, site: str) -> Path:
    """Expand {data_dir} (the site's own data directory) and {site} in a job's path argument."""
    data_dir = os.environ.get("FEDLLM_DATA_DIR", "")
    return Path(template.format(data_dir=data_dir, site=site)).expanduser()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", default="{data_dir}/train.npz")
    parser.add_argument("--val", default="{data_dir}/val.npz")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import nvflare.client as flare

    flare.init()
    site = flare.get_site_name()
    x, y = load_split(resolve_path(args.train, site))
    vx, vy = load_split(resolve_path(args.val, site))
    print(f"[{site}] {len(x)} training and {len(vx)} validation examples")

    while flare.is_running():
        incoming = flare.receive()
        model = TinyClassifier.from_state_dict(incoming.params)
        before = evaluate(model, vx, vy)
        seed = args.seed * 1000 + incoming.current_round
        steps, train_loss = train_epochs(model, x, y, args.epochs, args.lr, args.batch_size, seed)
        after = evaluate(model, vx, vy)
        print(
            f"[{site}] round {incoming.current_round}: global val acc {before.accuracy:.3f} → "
            f"local val acc {after.accuracy:.3f} (train loss {train_loss:.3f}, {steps} steps)"
        )
        flare.send(
            flare.FLModel(
                params=model.state_dict(),
                metrics={
                    "val_accuracy": after.accuracy,
                    "val_loss": after.loss,
                    "train_loss": train_loss,
                    "global_val_accuracy": before.accuracy,
                },
                meta={"NUM_STEPS_CURRENT_ROUND": steps},
            )
        )
