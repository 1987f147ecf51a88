"""Reading a downloaded job result: per-round metrics, live metrics, the final evaluation, the global model.

`fedllm job submit --download DIR` (or the admin console's download_job) leaves NVFlare's server
workspace of the job under DIR/<job id>/workspace. What people read in it:

- round_metrics.jsonl (NVFlare's MetricsArtifactWriter): per round, what each site sent with its
  weights and their FedAvg-weighted mean: global_val_* (the model the site received) always, the
  site's metrics after training too for fedllm's own loop (p-tuning, NeMo, toy);
- tb_events/<site>/ (NVFlare's TensorBoard receiver): every scalar each site streamed while the job
  ran (`read_site_scalars`);
- cross_site_val/cross_val_results.json (NVFlare's final global evaluation): every site's
  evaluation of the final global model (`read_final_evaluation`);
- FL_global_model.pt / best_FL_global_model.pt: the final and the best global model.
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
TB_EVENTS = Path("workspace") / "tb_events"
FINAL_EVALUATION = Path("workspace") / "cross_site_val" / "cross_val_results.json"
FINAL_MODEL_NAME = "SRV_FL_global_model.pt"  # NVFlare's names of the final and the best global model there
BEST_MODEL_NAME = "SRV_best_FL_global_model.pt"


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


def read_site_scalars(result_dir: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{site: {tag: [(step, value), ...]}} of what the sites streamed to the server's TensorBoard."""
    root = result_dir / TB_EVENTS
    if not root.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for site_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        events = EventAccumulator(str(site_dir), size_guidance={"scalars": 0})
        events.Reload()
        out[site_dir.name] = {
            tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags().get("scalars", [])
        }
    return out


def read_final_evaluation(result_dir: Path, model: str = FINAL_MODEL_NAME) -> dict[str, dict[str, float]]:
    """{site: metrics} of every site's evaluation of the final global model ({} when the job had none)."""
    path = result_dir / FINAL_EVALUATION
    if not path.is_file():
        return {}
    results = json.loads(path.read_text())
    return {site: dict(by_model[model]) for site, by_model in sorted(results.items()) if model in by_model}
