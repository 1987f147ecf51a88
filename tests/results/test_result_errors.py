"""Damaged results and wrong arguments: `report`, `infer` and `export-hf` end in one line that says what, where and
the fix (or, for report, in a report that lists what it left out), never in a traceback or a silent drop."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from fedllm.results.metrics import ROUND_METRICS, ResultError, load_global_state, read_round_metrics
from tests.support.cli_fuzz import Outcome, assert_clean, run_cli
from tests.support.job_results import write_job_result

SFT_MODEL = "fedllm.flare.server_models.CausalLMWeights"
LOSSES = [{"site-1": {"global_val_loss": 3.0 - r, "val_loss": 2.5 - r}} for r in range(3)]


@pytest.fixture(scope="module")
def sft_result(tiny_gpt, tmp_path_factory) -> Path:
    """An SFT job's result as the job's own writers leave it: 3 rounds of metrics, final and best global model."""
    return write_job_result(tmp_path_factory.mktemp("sft") / "result", SFT_MODEL, {"model": str(tiny_gpt)}, LOSSES)


def _one_line_error(outcome: Outcome, *needles: str) -> str:
    """The command failed with fedllm's own error, on one line, holding every needle."""
    assert_clean(outcome, allowed=(1,))
    message = outcome.err.strip()
    assert len(message.splitlines()) == 1, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def _copy(result: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(result, to)
    return to


# ---- report: round_metrics.jsonl ----------------------------------------------------------------------------


def test_report_leaves_out_damaged_lines_and_says_which(sft_result: Path, tmp_path: Path) -> None:
    result = _copy(sft_result, tmp_path / "result")
    path = result / ROUND_METRICS
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:40]  # a line cut short (not JSON)
    lines.insert(2, json.dumps({"aggregated_metrics": [], "sites": []}))  # a line without "round"
    path.write_text("\n".join(lines) + "\n")
    outcome = run_cli(["report", f"sft={result}", "--out", tmp_path / "out"])
    assert_clean(outcome, allowed=(0,))
    note = "skipped 2 of 4 lines (line 2: not JSON"
    assert note in outcome.err and "line 3: has no 'round'" in outcome.err
    assert "| sft | val_loss | 3 |" in outcome.out  # rounds 0 and 2 are drawn; the run had 3 rounds
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## Left out" in markdown and note in markdown


def test_report_on_only_damaged_lines_fails_naming_the_file_and_line(sft_result: Path, tmp_path: Path) -> None:
    result = _copy(sft_result, tmp_path / "result")
    (result / ROUND_METRICS).write_bytes(b"\x00\xffgarbage\n")
    message = _one_line_error(
        run_cli(["report", str(result), "--out", tmp_path / "out"]), str(result / ROUND_METRICS), "line 1: not UTF-8"
    )
    assert message.startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_round_metrics_readers_refuse_a_damaged_line(sft_result: Path, tmp_path: Path) -> None:
    result = _copy(sft_result, tmp_path / "result")
    path = result / ROUND_METRICS
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[1]["aggregated_metrics"][0]["value"] = [1]  # a wrong type
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ResultError, match=r"line 2: aggregated_metrics\[0\] \(global_val_loss\) value is \[1\]"):
        read_round_metrics(result)


def test_report_refuses_two_runs_of_one_name(sft_result: Path, tmp_path: Path) -> None:
    outcome = run_cli(["report", str(sft_result), str(sft_result), "--out", tmp_path / "out"])
    assert_clean(outcome, allowed=(2,))
    assert "twice" in outcome.err


# ---- the global model: FL_global_model.pt -------------------------------------------------------------------


def _flip_in_tensor_data(path: Path) -> None:
    """Flip one bit in the middle of the largest tensor record (what bit rot or a bad copy does)."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        data = bytearray(path.read_bytes())
        header = info.header_offset
        start = header + 30 + int.from_bytes(data[header + 26 : header + 28], "little")
        start += int.from_bytes(data[header + 28 : header + 30], "little")
    data[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_torch_load_alone_does_not_see_a_flipped_bit_in_the_weights(sft_result: Path, tmp_path: Path) -> None:
    """Why fedllm checks the CRCs itself: torch.load returns the wrong number without a word."""
    checkpoint = _copy(sft_result, tmp_path / "result") / "workspace" / "app_server" / "FL_global_model.pt"
    good = torch.load(checkpoint, weights_only=True)["model"]
    _flip_in_tensor_data(checkpoint)
    flipped = torch.load(checkpoint, weights_only=True)["model"]
    assert any(not torch.equal(good[k], flipped[k]) for k in good)
    with pytest.raises(ResultError, match="Bad CRC-32"):
        load_global_state(checkpoint)


@pytest.mark.parametrize("damage", ["truncated", "text", "empty", "bit flip"])
def test_infer_and_export_on_a_damaged_global_model_fail_naming_it(
    sft_result: Path, tiny_gpt: Path, tmp_path: Path, damage: str
) -> None:
    result = _copy(sft_result, tmp_path / "result")
    checkpoint = result / "workspace" / "app_server" / "FL_global_model.pt"
    data = checkpoint.read_bytes()
    if damage == "bit flip":
        _flip_in_tensor_data(checkpoint)
    else:
        checkpoint.write_bytes({"truncated": data[: len(data) // 2], "text": b"hello\n", "empty": b""}[damage])
    _one_line_error(run_cli(["infer", "--model", tiny_gpt, "--sft", result, "--sentence", "x"]), str(checkpoint))
    out = tmp_path / "export"
    _one_line_error(run_cli(["export-hf", result, "--model", tiny_gpt, "--out", out]), str(checkpoint), "Fix:")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["result"]  # no staging folder left


# ---- the base model: --model ----------------------------------------------------------------------------------


def test_infer_on_a_missing_model_folder_says_so(sft_result: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    _one_line_error(run_cli(["infer", "--model", missing, "--sentence", "x"]), f"--model {missing}: no such folder")
    _one_line_error(run_cli(["export-hf", sft_result, "--model", missing, "--out", tmp_path / "o"]), "no such folder")


def test_infer_on_a_model_folder_without_tokenizer_says_so(tiny_gpt: Path, tmp_path: Path) -> None:
    """transformers would load an empty tokenizer and infer would print a label for nothing."""
    import shutil

    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_gpt / name, folder / name)
    _one_line_error(run_cli(["infer", "--model", folder, "--sentence", "x"]), f"--model {folder}", "no tokenizer")


# ---- flags: each command's errors name its own -------------------------------------------------------------


def test_errors_name_the_flags_of_the_command_that_runs(sft_result: Path, tiny_gpt: Path, tmp_path: Path) -> None:
    lora_state = {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(8, 96)}
    lora = tmp_path / "lora"
    (lora / "workspace" / "app_server").mkdir(parents=True)
    torch.save({"model": lora_state}, lora / "workspace" / "app_server" / "FL_global_model.pt")

    export = _one_line_error(run_cli(["export-hf", sft_result, "--model", tiny_gpt, "--out", tmp_path / "a", "--lora"]))
    assert "export it without --lora" in export and "--sft" not in export and "--adapter" not in export
    export = _one_line_error(run_cli(["export-hf", lora, "--model", tiny_gpt, "--out", tmp_path / "b"]))
    assert "export it with --lora" in export and "--sft" not in export and "--adapter" not in export

    infer = _one_line_error(run_cli(["infer", "--model", tiny_gpt, "--adapter", sft_result]))
    assert "pass it with --sft instead of --adapter" in infer
    infer = _one_line_error(run_cli(["infer", "--model", tiny_gpt, "--sft", lora]))
    assert "pass it with --adapter instead of --sft" in infer and "--lora " not in infer


def test_infer_best_reads_the_best_global_model(sft_result: Path, tiny_gpt: Path, tmp_path: Path) -> None:
    """--best is not ignored by p-tuning inference: without a best model the command says so."""
    result = _copy(sft_result, tmp_path / "result")
    best = result / "workspace" / "app_server" / "best_FL_global_model.pt"
    best.unlink()
    _one_line_error(
        run_cli(["infer", "--model", tiny_gpt, "--prompt-encoder", result, "--best", "--sentence", "x"]),
        "best_FL_global_model.pt",
    )


def test_report_lists_a_damaged_tensorboard_event_file(tmp_path: Path) -> None:
    """TensorBoard's reader stops at a damaged record without a word; the report says what it lost."""
    from torch.utils.tensorboard import SummaryWriter

    result = tmp_path / "sft"
    (result / ROUND_METRICS).parent.mkdir(parents=True)
    record = {"round": 0, "aggregated_metrics": [{"name": "global_val_loss", "value": 3.0}], "sites": []}
    (result / ROUND_METRICS).write_text(json.dumps(record) + "\n")
    writer = SummaryWriter(str(result / "workspace" / "tb_events" / "site-1"))
    for step, value in enumerate((2.0, 1.5, 1.2)):
        writer.add_scalar("val_loss", value, step)
    writer.close()
    (events,) = (result / "workspace" / "tb_events" / "site-1").iterdir()
    data = bytearray(events.read_bytes())
    data[-10] ^= 0x01  # in the last record: val_loss 1.2 of step 2
    events.write_bytes(bytes(data))
    outcome = run_cli(["report", f"sft={result}", "--out", tmp_path / "out"])
    assert_clean(outcome, allowed=(0,))
    assert f"{events}: record 4 (byte" in outcome.err and "fails its CRC-32C" in outcome.err
    assert "| sft | val_loss | 1 | - | - | - | 1.500 | site-1 1.500 |" in outcome.out  # step 2 is the one lost
