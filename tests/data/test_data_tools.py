"""Data tools on small files in each real format: FPB text, jsonl, Alpaca/OASST1 parquet, Dolly jsonl."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedllm.cli.main import main
from fedllm.data import DataError, read_jsonl
from fedllm.data.fpb import prepare_fpb
from fedllm.data.sft import combine, prepare_sft
from fedllm.data.split import split_file
from fedllm.data.synthetic import sentiment_records


def _fpb_folder(root: Path, n: int = 40) -> Path:
    raw = root / "FinancialPhraseBank-v1.0"
    raw.mkdir(parents=True)
    labels = ["positive", "neutral", "negative"]
    lines = [f"Sales of Oy Äbc rose {i} % , the CEO said @ home .@{labels[i % 3]}" for i in range(n)]
    (raw / "Sentences_50Agree.txt").write_bytes("\r\n".join(lines).encode("iso-8859-1"))
    (raw / "Sentences_AllAgree.txt").write_bytes("\n".join(lines[:10]).encode("iso-8859-1"))
    return raw


def test_fpb_reads_latin1_splits_80_10_10_and_is_seeded(tmp_path: Path) -> None:
    raw = _fpb_folder(tmp_path)
    counts = prepare_fpb(raw, tmp_path / "out", seed=1).written
    assert [n for n in counts.values()] == [32, 4, 4]
    train = read_jsonl(tmp_path / "out" / "financial_phrase_bank_train.jsonl")
    assert set(train[0]) == {"taskname", "sentence", "label"} and train[0]["taskname"] == "sentiment"
    assert "Äbc" in train[0]["sentence"] and train[0]["sentence"].endswith("@ home .")  # the label is after the last @
    all_sentences = sorted(r["sentence"] for f in counts for r in read_jsonl(f))
    assert len(set(all_sentences)) == 40
    again = prepare_fpb(raw, tmp_path / "again", seed=1).written
    assert read_jsonl(next(iter(again))) == train
    assert sum(prepare_fpb(raw, tmp_path / "all", agreement="all").written.values()) == 10


def test_fpb_bad_inputs_fail_clearly_without_partial_output(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"Sentences_50Agree\.txt"):
        prepare_fpb(tmp_path, tmp_path / "out")
    raw = _fpb_folder(tmp_path)
    with (raw / "Sentences_50Agree.txt").open("ab") as f:
        f.write(b"\nA strange line .@bullish\n")
    with pytest.raises(DataError, match=r"Sentences_50Agree.txt:41: unknown label 'bullish'"):
        prepare_fpb(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    with pytest.raises(DataError, match="agreement level"):
        prepare_fpb(raw, tmp_path / "out", agreement="90")


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_even_split_partitions_every_record_once(tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "train.jsonl", sentiment_records(100, seed=3))
    prepared, labels = split_file(source, 3, tmp_path / "sites", seed=0)
    counts = prepared.written
    assert [p.name for p in counts] == ["site-1.jsonl", "site-2.jsonl", "site-3.jsonl"]
    assert sorted(counts.values()) == [33, 33, 34]
    sentences = [r["sentence"] for p in counts for r in read_jsonl(p)]
    assert sorted(sentences) == sorted(r["sentence"] for r in read_jsonl(source))
    assert sum(labels, Counter()) == Counter(r["label"] for r in read_jsonl(source))


def test_dirichlet_split_skews_labels_and_keeps_a_minimum(tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "train.jsonl", sentiment_records(600, seed=3))
    prepared, labels = split_file(source, 3, tmp_path / "sites", alpha=0.3, seed=1, min_per_site=30)
    counts = prepared.written
    assert min(counts.values()) >= 30 and sum(counts.values()) == 600
    # Strong skew: some site's most common label is well over the even share (1/3).
    assert max(c.most_common(1)[0][1] / sum(c.values()) for c in labels) > 0.6
    _, even_labels = split_file(source, 3, tmp_path / "even", seed=1)
    assert max(c.most_common(1)[0][1] / sum(c.values()) for c in even_labels) < 0.45


def test_split_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        split_file(tmp_path / "missing.jsonl", 2, tmp_path / "out")
    few = _jsonl(tmp_path / "few.jsonl", sentiment_records(2))
    with pytest.raises(DataError, match="fewer than 3 sites"):
        split_file(few, 3, tmp_path / "out")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"sentence": "a", "label": "positive"}\nnot json\n')
    with pytest.raises(DataError, match=r"broken.jsonl:2: not valid JSON"):
        split_file(broken, 1, tmp_path / "out")
    unlabeled = _jsonl(tmp_path / "sft.jsonl", [{"input": "q", "output": "a"}] * 4)
    with pytest.raises(DataError, match="'label' field"):
        split_file(unlabeled, 2, tmp_path / "out", alpha=0.5)
    assert not (tmp_path / "out").exists()


def test_alpaca_parquet_to_input_output(tmp_path: Path) -> None:
    rows = {
        "instruction": [f"Say {i}" for i in range(10)],
        "input": ["in context" if i % 2 else "" for i in range(10)],
        "output": [f"out {i}" for i in range(10)],
    }
    pq.write_table(pa.table(rows), tmp_path / "alpaca.parquet")
    counts = prepare_sft("alpaca", tmp_path / "alpaca.parquet", tmp_path / "out", seed=0).written
    assert [p.name for p in counts] == ["training.jsonl", "validation.jsonl", "testing.jsonl"]
    assert list(counts.values()) == [8, 1, 1]
    records = [r for p in counts for r in read_jsonl(p)]
    assert all(set(r) == {"input", "output"} for r in records)
    joined = [r["input"] for r in records if "in context" in r["input"]]
    assert len(joined) == 5 and all("\n\n" in text for text in joined)
    assert {text.split("\n\n")[0] == "in context" for text in joined} == {True, False}  # seeded random order


def test_dolly_jsonl_and_oasst1_trees(tmp_path: Path) -> None:
    dolly = _jsonl(
        tmp_path / "dolly.jsonl",
        [{"instruction": f"Q{i}", "context": "", "response": f"A{i}", "category": "qa"} for i in range(5)],
    )
    counts = prepare_sft("dolly", dolly, tmp_path / "dolly", name="dolly").written
    assert sorted(r["input"] for p in counts for r in read_jsonl(p)) == [f"Q{i}" for i in range(5)]

    messages = {
        "message_id": ["p1", "a1", "p2", "a2", "a3", "pde", "ade"],
        "parent_id": [None, "p1", "a1", "p2", "p1", None, "pde"],
        "role": ["prompter", "assistant", "prompter", "assistant", "assistant", "prompter", "assistant"],
        "text": ["Hi?", "Hello.", "How are you?", "Fine.", "Hey!", "Hallo?", "Guten Tag."],
        "lang": ["en", "en", "en", "en", "en", "de", "de"],
        "rank": [None, 0.0, None, 0.0, 1.0, None, 0.0],  # "Hey!" ranks below "Hello."
    }
    pq.write_table(pa.table(messages), tmp_path / "oasst.parquet")
    validation = {"message_id": ["vp", "va"], "parent_id": [None, "vp"], "role": ["prompter", "assistant"],
                  "text": ["Why?", "Because."], "lang": ["en", "en"], "rank": [None, 0.0]}  # fmt: skip
    pq.write_table(pa.table(validation), tmp_path / "oasst_val.parquet")
    counts = prepare_sft(
        "oasst1", tmp_path / "oasst.parquet", tmp_path / "oasst", extra_input=tmp_path / "oasst_val.parquet"
    ).written
    pairs = sorted((r["input"], r["output"]) for p in counts for r in read_jsonl(p))
    # Only rank-0 English replies with their prompter parent; the validation parquet is appended before the split.
    assert pairs == [("Hi?", "Hello."), ("How are you?", "Fine."), ("Why?", "Because.")]
    no_rank = {k: v for k, v in messages.items() if k != "rank"}
    pq.write_table(pa.table(no_rank), tmp_path / "old.parquet")
    with pytest.raises(DataError, match=r"missing column.*rank"):
        prepare_sft("oasst1", tmp_path / "old.parquet", tmp_path / "x")


def test_sft_bad_input(tmp_path: Path) -> None:
    pq.write_table(pa.table({"instruction": ["a"], "output": ["b"]}), tmp_path / "alpaca.parquet")
    with pytest.raises(DataError, match=r"missing column.*input"):
        prepare_sft("alpaca", tmp_path / "alpaca.parquet", tmp_path / "out")
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable parquet"):
        prepare_sft("alpaca", tmp_path / "fake.parquet", tmp_path / "out")
    with pytest.raises(DataError, match="format 'sharegpt' unknown"):
        prepare_sft("sharegpt", tmp_path / "fake.parquet", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_combine_concatenates_sites(tmp_path: Path) -> None:
    a = _jsonl(tmp_path / "a.jsonl", [{"input": "1", "output": "x"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"input": "2", "output": "y"}, {"input": "3", "output": "z"}])
    assert combine([a, b], tmp_path / "all.jsonl").written == {tmp_path / "all.jsonl": 3}
    assert sorted(r["input"] for r in read_jsonl(tmp_path / "all.jsonl")) == ["1", "2", "3"]


def test_cli_split_prints_the_label_table_and_errors_exit_1(tmp_path: Path, capsys) -> None:
    source = _jsonl(tmp_path / "train.jsonl", sentiment_records(60, seed=3))
    assert main(["data", "split", "--input", str(source), "--num-sites", "2", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "site-1" in out and "negative" in out and "positive" in out
    assert main(["data", "fpb", "--raw", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 1
    assert "is not a directory" in capsys.readouterr().err
