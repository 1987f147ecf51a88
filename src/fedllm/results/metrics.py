"""Reading a downloaded job result: per-round metrics and the server's global model.

`fedllm job submit --download DIR` (or the admin console's download_job) leaves NVFlare's server
workspace of the job under DIR/<job id>/workspace; these are the two things in it people read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fedllm.errors import FedllmError

# Where NVFlare's FedAvg (PTFileModelPersistor) keeps the final and the best global model.
GLOBAL_MODEL = Path("workspace") / "app_server" / "FL_global_model.pt"
BEST_GLOBAL_MODEL = Path("workspace") / "app_server" / "best_FL_global_model.pt"
ROUND_METRICS = Path("workspace") / "metrics" / "round_metrics.jsonl"


class ResultError(FedllmError):
    """A job result folder does not hold what was asked for; the message says what to pass instead."""


def read_round_metrics(result_dir: Path) -> list[dict]:
    """Per-round aggregated and per-site metrics NVFlare's FedAvg recorded on the server."""
    path = result_dir / ROUND_METRICS
    if not path.is_file():
        return []
    rounds = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        rounds.append(
            {
                "round": rec["round"],
                "aggregated": {m["name"]: m["value"] for m in rec.get("aggregated_metrics", [])},
                "sites": {
                    s["name"]: {m["name"]: m["value"] for m in s.get("metrics", [])} for s in rec.get("sites", [])
                },
            }
        )
    return rounds


def global_model_path(path: Path, *, best: bool = False) -> Path:
    """The global model checkpoint of a job result folder (or `path` itself when it is the .pt file)."""
    if path.is_dir():
        candidate = path / (BEST_GLOBAL_MODEL if best else GLOBAL_MODEL)
        if candidate.is_file():
            return candidate
        raise ResultError(
            f"{path} holds no {candidate.relative_to(path)}; pass the folder `fedllm job submit --download` wrote "
            "for a finished FedAvg job (or the .pt file itself)"
        )
    if not path.is_file():
        raise ResultError(f"{path} not found; pass FL_global_model.pt or the job's downloaded result folder")
    return path


def load_global_state(path: Path, *, best: bool = False) -> dict[str, torch.Tensor]:
    """The server's global weights (the persistor's checkpoint holds them under "model")."""
    ckpt = torch.load(global_model_path(path, best=best), map_location="cpu", weights_only=True)
    return ckpt.get("model", ckpt)
