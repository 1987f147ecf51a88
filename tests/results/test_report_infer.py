"""`fedllm report` on results in NVFlare's round_metrics.jsonl format; `fedllm infer` on a tuned encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedllm.cli.main import main
from fedllm.results.report import ReportError, run_curves, write_report


def _result(root: Path, name: str, per_round: list[dict[str, float]], final: dict[str, float] | None = None) -> Path:
    """A downloaded job result holding one site's metrics per round (the shape NVFlare's FedAvg writes)."""
    path = root / name / "workspace" / "metrics" / "round_metrics.jsonl"
    path.parent.mkdir(parents=True)
    lines = []
    for rnd, metrics in enumerate(per_round):
        entries = [{"name": k, "value": v} for k, v in metrics.items()]
        lines.append(
            json.dumps({"round": rnd, "aggregated_metrics": entries, "sites": [{"name": "site-1", "metrics": entries}]})
        )
    path.write_text("\n".join(lines) + "\n")
    if final is not None:  # NVFlare's final global evaluation (ValidationJsonGenerator's file)
        cse = root / name / "workspace" / "cross_site_val" / "cross_val_results.json"
        cse.parent.mkdir(parents=True)
        cse.write_text(json.dumps({s: {"SRV_FL_global_model.pt": final} for s in ("site-1", "site-2")}))
    return root / name


def test_report_draws_fedavg_and_local_runs_with_the_final_global_model(tmp_path: Path) -> None:
    fedavg = _result(
        tmp_path, "fedavg", [{"val_accuracy": a, "global_val_accuracy": a - 0.1} for a in (0.4, 0.7, 0.9)],
        final={"global_val_accuracy": 0.95, "global_val_macro_f1": 0.94, "global_val_loss": 0.2},
    )  # fmt: skip
    local = _result(tmp_path, "local", [{"val_accuracy": 0.6}])
    report = write_report({"FedAvg": fedavg, "local": local}, tmp_path / "out", title="t")
    assert report.png.read_bytes()[:4] == b"\x89PNG" and report.png.stat().st_size > 10_000
    # final global model = the number the demo prints; the best received model and its round, numbered from 0.
    assert "| FedAvg | val_accuracy | 3 | 0.950 | 0.940 | 0.800 (2) | 0.900 | site-1 0.900 |" in report.table
    assert "| local | val_accuracy | 1 | - | - | - | 0.600 | site-1 0.600 |" in report.table
    assert "report.png" in report.markdown.read_text()
    assert run_curves(fedavg).headline == 0.95


def test_report_uses_loss_and_the_streamed_curves_of_hf_sft_sites(tmp_path: Path, capsys) -> None:
    from torch.utils.tensorboard import SummaryWriter

    sft = _result(tmp_path, "sft", [{"global_val_loss": 3.0}, {"global_val_loss": 2.0}], final={"global_val_loss": 1.2})
    for site, values in (("site-1", (2.1, 1.4)), ("site-2", (1.9, 1.2))):  # what NVFlare's TB receiver writes
        writer = SummaryWriter(str(sft / "workspace" / "tb_events" / site))
        for step, value in zip((6, 12), values, strict=True):
            writer.add_scalar("val_loss", value, step)
        writer.close()
    curves = run_curves(sft)
    assert curves.after_training == [(0, pytest.approx(2.0)), (1, pytest.approx(1.3))]
    assert main(["report", f"SFT={sft}", "--out", str(tmp_path / "o")]) == 0
    assert (
        "| SFT | val_loss | 2 | 1.200 | - | 2.000 (1) | 1.300 | site-1 1.400, site-2 1.200 |" in capsys.readouterr().out
    )


def test_report_on_a_folder_without_metrics_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no round metrics"):
        write_report({"x": tmp_path}, tmp_path / "out")
    assert main(["report", str(tmp_path)]) == 1


def test_infer_prints_sentence_sentiment_label(tiny_gpt, tmp_path: Path, capsys) -> None:
    from fedllm.data.synthetic import sentiment_records
    from fedllm.flare.server_models import PeftPromptEncoderWeights
    from fedllm.training.core import run_round
    from fedllm.training.hf.ptuning import PTuningTask

    task = PTuningTask(str(tiny_gpt), sentiment_records(300, seed=5), sentiment_records(30, seed=6), lr=1e-2)
    state, _, _ = run_round(task, PeftPromptEncoderWeights(96).state_dict(), epochs=3, seed=0)
    ckpt = tmp_path / "FL_global_model.pt"
    torch.save({"model": state}, ckpt)
    sentence = sentiment_records(1, seed=42)[0]["sentence"]
    assert main(["infer", "--model", str(tiny_gpt), "--prompt-encoder", str(ckpt), "--sentence", sentence]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"{sentence} sentiment: ")
    assert out[0].rsplit(" ", 1)[1] in {"positive", "neutral", "negative"}
    # Default: the seeds' five example sentences.
    assert main(["infer", "--model", str(tiny_gpt), "--prompt-encoder", str(ckpt)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 5
    assert main(["infer", "--model", str(tiny_gpt), "--prompt-encoder", str(tmp_path / "none.pt")]) == 1
