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
import math
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# What to do about a damaged file of a downloaded result: the server keeps the job's workspace.
REDOWNLOAD = (
    "download the job's result again (`fedllm job submit --download DIR`, or the admin console's download_job) "
    "or restore the file from the server's workspace"
)


@dataclass(frozen=True)
class DamagedLine:
    """A line of round_metrics.jsonl that does not hold one round in NVFlare's format, and why."""

    number: int  # 1-based, as an editor shows it
    reason: str


@dataclass(frozen=True)
class RoundMetricsFile:
    """round_metrics.jsonl read line by line: the rounds it holds, and every line it could not use."""

    path: Path
    rounds: list[dict]  # {"round", "aggregated": {name: value}, "sites": {site: {name: value}}}
    damaged: list[DamagedLine]
    lines: int  # non-blank lines read
    nvflare_skipped: int = 0  # metrics NVFlare's writer itself left out (its skipped_metrics entries)

    def damage_summary(self, shown: int = 5) -> str:
        """ "skipped 2 of 5 lines (line 3: not JSON …; line 5: …)": what a reader of the report must know."""
        listed = "; ".join(f"line {d.number}: {d.reason}" for d in self.damaged[:shown])
        more = f"; and {len(self.damaged) - shown} more" if len(self.damaged) > shown else ""
        return f"skipped {len(self.damaged)} of {self.lines} lines ({listed}{more})"


def _metric_entries(entries: Any, where: str) -> dict[str, bool | int | float | str]:
    """NVFlare's [{"name", "value"}, ...] as {name: value}; ValueError says which entry is damaged."""
    if not isinstance(entries, list):
        raise ValueError(f"{where} is {_kind(entries)}, not a list")
    out: dict[str, bool | int | float | str] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry or "value" not in entry:
            raise ValueError(f"{where}[{i}] is not a {{name, value}} object")
        name, value = entry["name"], entry["value"]
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}[{i}].name is {_kind(name)}, not a metric name")
        if isinstance(value, str | bool) or (isinstance(value, int | float) and _finite(value)):
            pass  # what MetricsArtifactWriter writes: finite numbers, booleans, text (site metrics)
        else:
            raise ValueError(f"{where}[{i}] ({name}) value is {_kind(value)}, not a finite number or text")
        if name in out:
            raise ValueError(f"{where} holds {name!r} twice")
        out[name] = value
    return out


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond float's range
        return False


def _kind(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _round_record(line: bytes, previous: int | None) -> tuple[dict, int]:
    """One line as a round ({"round", "aggregated", "sites"}) and NVFlare's count of skipped metrics."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte {exc.start})") from None
    try:
        rec = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"is {_kind(rec)}, not a round's JSON object")
    for key in ("round", "aggregated_metrics", "sites"):
        if key not in rec:
            raise ValueError(f"has no {key!r}")
    rnd = rec["round"]
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
        raise ValueError(f"round is {_kind(rnd)}, not a round number")
    if previous is not None and rnd <= previous:
        raise ValueError(f"round {rnd} follows round {previous} (rounds only increase)")
    aggregated = _metric_entries(rec["aggregated_metrics"], "aggregated_metrics")
    if not isinstance(rec["sites"], list):
        raise ValueError(f"sites is {_kind(rec['sites'])}, not a list")
    sites: dict[str, dict] = {}
    for i, site in enumerate(rec["sites"]):
        if not isinstance(site, dict) or not isinstance(site.get("name"), str) or not site["name"]:
            raise ValueError(f"sites[{i}] is not a {{name, metrics}} object with a site name")
        if site["name"] in sites:
            raise ValueError(f"sites holds {site['name']!r} twice")
        sites[site["name"]] = _metric_entries(site.get("metrics"), f"sites[{i}].metrics")
    skipped = rec.get("skipped_metrics", [])
    if not isinstance(skipped, list):
        raise ValueError(f"skipped_metrics is {_kind(skipped)}, not a list")
    return {"round": rnd, "aggregated": aggregated, "sites": sites}, len(skipped)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON (NVFlare writes finite numbers only)")


def load_round_metrics(result_dir: Path) -> RoundMetricsFile | None:
    """round_metrics.jsonl with every damaged line set aside (and said why); None when the result has none."""
    path = result_dir / ROUND_METRICS
    if not path.is_file():
        return None
    rounds: list[dict] = []
    damaged: list[DamagedLine] = []
    lines = nvflare_skipped = 0
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        lines += 1
        try:
            record, skipped = _round_record(line, rounds[-1]["round"] if rounds else None)
        except ValueError as exc:
            damaged.append(DamagedLine(number, str(exc)))
            continue
        rounds.append(record)
        nvflare_skipped += skipped
    return RoundMetricsFile(path, rounds, damaged, lines, nvflare_skipped)


def read_round_metrics(result_dir: Path) -> list[dict]:
    """Per-round aggregated and per-site metrics NVFlare's FedAvg recorded on the server ([] when none).

    Every line must be a round in NVFlare's format: a damaged line is an error naming it, never dropped.
    """
    metrics = load_round_metrics(result_dir)
    if metrics is None:
        return []
    if metrics.damaged:
        first = metrics.damaged[0]
        raise ResultError(
            f"{metrics.path} line {first.number}: {first.reason} ({len(metrics.damaged)} of {metrics.lines} lines "
            f"damaged). Fix: {REDOWNLOAD}"
        )
    return metrics.rounds


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


def check_zip_crcs(path: Path) -> None:
    """Every record of a torch.save (zip) file read and checked against its CRC-32.

    torch.load checks none of the tensor records' CRCs: a flipped bit in the weights loads as a wrong
    number. Reading each record through zipfile does check them (and the archive's structure).
    """
    record = "the zip directory"
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                record = f"record {info.filename}"
                with archive.open(info) as data:
                    while data.read(1 << 24):
                        pass
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, struct.error, OverflowError) as exc:
        # BadZipFile: a CRC or header mismatch; the others: zipfile reading a mangled header (an unknown
        # compression method, a size past the end of the file)
        raise ResultError(f"{path} is damaged: {record}: {exc}. Fix: {REDOWNLOAD}") from exc


def load_global_state(path: Path, *, best: bool = False) -> dict[str, torch.Tensor]:
    """The server's global weights (the persistor's checkpoint holds them under "model"), CRC-checked."""
    source = global_model_path(path, best=best)
    if source.stat().st_size == 0:
        raise ResultError(f"{source} is empty. Fix: {REDOWNLOAD}")
    if not zipfile.is_zipfile(source):
        raise ResultError(
            f"{source} is not a torch.save checkpoint (no zip directory: truncated, or another kind of file). "
            f"Fix: {REDOWNLOAD}"
        )
    check_zip_crcs(source)
    try:
        ckpt = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's unpickler raises many types on a checkpoint it cannot read
        raise ResultError(
            f"{source} cannot be read as a torch checkpoint ({type(exc).__name__}: {str(exc)[:200]}). Fix: {REDOWNLOAD}"
        ) from exc
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else ckpt
    if not isinstance(state, dict) or not state:
        raise ResultError(
            f"{source} holds {type(state).__name__ if state else 'nothing'}, not a global model's state dict "
            f"(the persistor's {{'model': {{name: tensor}}}}). Fix: pass the FL_global_model.pt of a FedAvg job"
        )
    wrong = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if wrong:
        raise ResultError(
            f"{source}: the state dict's entry {wrong[0]!r} is not a named tensor. Fix: pass the FL_global_model.pt "
            "of a FedAvg job"
        )
    return state


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


def event_file_damage(result_dir: Path) -> list[str]:
    """Where each damaged TensorBoard event file under the result stops being whole, with what that leaves out.

    TensorBoard's reader stops at the first record whose TFRecord framing or CRC-32C fails and says
    nothing (it takes it for a record still being written): the scalars from there on would be
    dropped silently. A downloaded result is finished, so here such a record is damage.
    """
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    def crc(data: bytes) -> bytes:
        return masked_crc32c(data).to_bytes(4, "little")

    root = result_dir / TB_EVENTS
    damage = []
    for path in sorted(root.glob("*/*tfevents*")) if root.is_dir() else []:
        data, pos, number = path.read_bytes(), 0, 1
        while pos < len(data):
            header, length = data[pos : pos + 8], int.from_bytes(data[pos : pos + 8], "little")
            end = pos + 12 + length + 4
            if len(data) < pos + 12 or crc(header) != data[pos + 8 : pos + 12] or len(data) < end:
                problem = "is cut short or its length is damaged"
            elif crc(data[pos + 12 : end - 4]) != data[end - 4 : end]:
                problem = "fails its CRC-32C"
            else:
                pos, number = end, number + 1
                continue
            damage.append(
                f"{path}: record {number} (byte {pos}) {problem}; the scalars it and the rest of the file hold are "
                "left out"
            )
            break
    return damage


def read_final_evaluation(result_dir: Path, model: str = FINAL_MODEL_NAME) -> dict[str, dict[str, float]]:
    """{site: metrics} of every site's evaluation of the final global model ({} when the job had none)."""
    path = result_dir / FINAL_EVALUATION
    if not path.is_file():
        return {}
    try:
        results = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ResultError(f"{path} is not JSON ({exc}). Fix: {REDOWNLOAD}") from None
    if not isinstance(results, dict):
        raise ResultError(f"{path} holds {_kind(results)}, not {{site: {{model: metrics}}}}. Fix: {REDOWNLOAD}")
    final: dict[str, dict[str, float]] = {}
    for site, by_model in sorted(results.items()):
        if not isinstance(by_model, dict):
            raise ResultError(f"{path}: {site!r} holds {_kind(by_model)}, not {{model: metrics}}. Fix: {REDOWNLOAD}")
        if model not in by_model:
            continue
        metrics = by_model[model]
        if not isinstance(metrics, dict):
            raise ResultError(f"{path}: {site!r}.{model} is {_kind(metrics)}, not {{metric: value}}. Fix: {REDOWNLOAD}")
        for name, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value):
                raise ResultError(
                    f"{path}: {site!r}.{model}.{name} is {_kind(value)}, not a finite number. Fix: {REDOWNLOAD}"
                )
        final[site] = {name: float(value) for name, value in metrics.items()}
    return final
