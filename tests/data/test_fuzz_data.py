"""Fuzzing the data commands: malformed input ends in success that accounts for every record, or in an error.

Generated inputs (from valid files: bit flips, truncation, inserted or overwritten bytes, noise, other
encodings, a byte-order mark, blank lines, fields of the wrong type from `json_values()`, records that
are not objects, missing and extra fields, huge fields; parquet with damaged bytes, missing columns and
columns of the wrong type) are fed to `fedllm data split`, `combine`, `sft --format alpaca|dolly|oasst1`
and `fpb`. Each run must end (tests/support/cli_fuzz.py) in

- success, where the printed accounting adds up (read = context + skipped + written, per
  tests/support/data_report.py) and the records written are those an independent reading of the input
  finds (split, combine, fpb: exactly the input's; sft: the examples with both texts), or
- fedllm's own one-line error (or a usage error), never a traceback,

and a failed run leaves the output folder as it was (its earlier file kept) with no temp file anywhere.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import event, given
from hypothesis import strategies as st

from fedllm.data.synthetic import sentiment_records
from tests.support.cli_fuzz import (
    FUZZ_SETTINGS,
    Outcome,
    assert_clean,
    assert_no_partial_output,
    corrupted,
    json_values,
    run_cli,
    snapshot,
    temp_leftovers,
)
from tests.support.data_report import Accounting, accounting

ODD_TEXT = ["Oy Äbc €", "naïve 日本", "emoji 🙂", "tab\there", 'quote " back\\slash', "nel \x85 ls \u2028"]
SENTIMENT = [
    {**record, "sentence": f"{record['sentence']} {ODD_TEXT[i % len(ODD_TEXT)]}"}
    for i, record in enumerate(sentiment_records(10, seed=5))
]
DOLLY = [
    {"instruction": f"Q{i} {ODD_TEXT[i % 6]}", "context": "" if i % 2 else "ctx", "response": f"A{i}", "category": "qa"}
    for i in range(8)
]


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    """A fresh folder per example (Hypothesis reuses the test's fixtures across examples)."""
    with tempfile.TemporaryDirectory(prefix="fedllm-fuzz-") as root:
        yield Path(root)


# --- generated inputs ---------------------------------------------------------------------------


def _one_in(draw, k: int) -> bool:
    """True about once in k draws (Hypothesis favours an integer range's lower end, so test the upper)."""
    return draw(st.integers(1, k)) == k


@st.composite
def damaged_records(draw, records: list[dict]) -> list:
    """The records with fields of wrong types, fields missing or added, non-objects, huge values."""
    records = [dict(r) for r in records]
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(records) - 1))
        kind = draw(
            st.sampled_from(["wrong type", "null", "blank", "drop field", "extra field", "not an object", "huge"])
        )
        record = records[i]
        if not isinstance(record, dict) or not record:
            continue
        key = draw(st.sampled_from(sorted(record)))
        if kind == "wrong type":
            record[key] = draw(json_values())
        elif kind == "null":
            record[key] = None
        elif kind == "blank":
            record[key] = draw(st.sampled_from(["", " ", "\n\t"]))
        elif kind == "drop field":
            del record[key]
        elif kind == "extra field":
            record[draw(st.text(max_size=8))] = draw(json_values())
        elif kind == "not an object":
            records[i] = draw(json_values())
        else:
            record[key] = draw(st.sampled_from(["x" * 300_000, HUGE_NUMBER, DEEP_NESTING]))
    return records


HUGE_NUMBER, DEEP_NESTING = "<fuzz: a 5000-digit number>", "<fuzz: 3000 nested lists>"
RAW_JSON = {HUGE_NUMBER: "9" * 5000, DEEP_NESTING: "[" * 3000 + "]" * 3000}


def _dumps(value, ascii_only: bool) -> str:
    """json.dumps, with the sentinels written as raw JSON json.dumps cannot produce."""
    if isinstance(value, str) and value in RAW_JSON:
        return RAW_JSON[value]
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {_dumps(v, ascii_only)}" for k, v in value.items()) + "}"
    return json.dumps(value, ensure_ascii=ascii_only)


@st.composite
def jsonl_bytes(draw, records: list[dict]) -> bytes:
    """A jsonl file made from `records`: damaged records, blank lines, another encoding, damaged bytes."""
    ascii_only = draw(st.booleans())
    lines = [_dumps(r, ascii_only) for r in draw(damaged_records(records))]
    for _ in range(draw(st.integers(0, 3))):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(["", "  ", "\t", "\r"])))
    text = draw(st.sampled_from(["\n", "\r\n"])).join(lines) + draw(st.sampled_from(["", "\n"]))
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252"]))
    data = text.encode(encoding, errors="replace")
    return draw(corrupted(data)) if _one_in(draw, 3) else data


@st.composite
def _texts(draw) -> str | None:
    """Mostly text (odd characters included), one value in four empty: null, "" or blank."""
    if _one_in(draw, 4):
        return draw(st.sampled_from([None, "", " ", "\n"]))
    return draw(st.sampled_from(ODD_TEXT) | st.text(min_size=1, max_size=12))


def _values(draw, kind: str, n: int) -> pa.Array:
    if kind in ("text", "large text", "dictionary"):
        values = pa.array(draw(st.lists(_texts(), min_size=n, max_size=n)), type=pa.string())
        return {"text": values, "large text": values.cast(pa.large_string()), "dictionary": values.dictionary_encode()}[
            kind
        ]
    if kind == "int":
        return pa.array(draw(st.lists(st.none() | st.integers(-3, 3), min_size=n, max_size=n)), type=pa.int64())
    if kind == "float":
        floats = st.none() | st.sampled_from([0.0, 1.0, 2.0, 0.5, -1.0, math.nan, math.inf])
        return pa.array(draw(st.lists(floats, min_size=n, max_size=n)), type=pa.float64())
    if kind == "bool":
        return pa.array(draw(st.lists(st.none() | st.booleans(), min_size=n, max_size=n)), type=pa.bool_())
    if kind == "list":
        return pa.array(draw(st.lists(st.none() | st.lists(st.text(max_size=3), max_size=2), min_size=n, max_size=n)))
    return pa.nulls(n)


def _parquet_bytes(columns: dict[str, pa.Array]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns) if columns else pa.table({"other": pa.nulls(0)}), buffer)
    return buffer.getvalue()


WRONG_KINDS = ["int", "float", "bool", "list", "null"]


def _damaged(draw) -> bool:
    """One example in three damages the file's structure; the others test the records' accounting."""
    return _one_in(draw, 3)


@st.composite
def alpaca_parquet(draw) -> bytes:
    """Alpaca's parquet with empty and null texts, columns missing or of another type, or damaged bytes."""
    n = draw(st.integers(3, 16) | st.integers(0, 2))
    kinds = ["text", "large text", "dictionary"] + (["missing", *WRONG_KINDS] if _damaged(draw) else [])
    columns = {}
    for name in ("instruction", "input", "output"):
        kind = draw(st.sampled_from(kinds))
        if kind != "missing":
            columns[name] = _values(draw, kind, n)
    if draw(st.booleans()):
        columns["extra"] = _values(draw, "int", n)
    data = _parquet_bytes(columns)
    return draw(corrupted(data)) if _damaged(draw) else data


ODD_REPLY = {  # one field of a reply the seed's rule (or fedllm's checks) leaves out, and its odd values
    "parent_id": ["gone", None, "{first reply}"],
    "role": ["prompter", "system", None],
    "text": ["", " ", None],
    "lang": ["de", None],
    "rank": [1.0, 2.0, None, math.nan],
}


@st.composite
def oasst1_parquet(draw) -> bytes:
    """OASST1 message trees: replies ranked, unranked, NaN-ranked, in other languages, orphaned; odd roles and types."""
    names = ["message_id", "parent_id", "role", "text", "lang", "rank"]
    rows = []
    for p in range(0 if _one_in(draw, 8) else draw(st.integers(3, 8))):
        prompt_text = draw(st.sampled_from([ODD_TEXT[p % 6], "Hi?", "Hi?", "", None]))
        rows.append((f"p{p}", draw(st.sampled_from([None, None, "a0.0", "gone"])), "prompter", prompt_text, "en", None))
        for a in range(draw(st.integers(1, 3) | st.just(0))):
            reply = dict(zip(names, (f"a{p}.{a}", f"p{p}", "assistant", ODD_TEXT[a], "en", 0.0), strict=True))
            if _one_in(draw, 4):
                field = draw(st.sampled_from(sorted(ODD_REPLY)))
                reply[field] = draw(st.sampled_from(ODD_REPLY[field]))
                reply[field] = f"a{p}.0" if reply[field] == "{first reply}" else reply[field]
            rows.append(tuple(reply.values()))
    if rows and _one_in(draw, 8):
        rows.append(draw(st.sampled_from(rows)))  # a message id twice
    columns = {name: pa.array([r[i] for r in rows], type=pa.float64() if name == "rank" else pa.string())
               for i, name in enumerate(names)}  # fmt: skip
    if _damaged(draw):
        name = draw(st.sampled_from(names))
        kind = draw(st.sampled_from(["missing", "text", *WRONG_KINDS]))
        if kind == "missing":
            del columns[name]
        else:
            columns[name] = _values(draw, kind, len(rows))
    data = _parquet_bytes(columns)
    return draw(corrupted(data)) if _damaged(draw) else data


@st.composite
def phrasebank_bytes(draw) -> bytes:
    """A Sentences_50Agree.txt: odd labels, lines without '@', blank lines, line-end look-alikes, damaged bytes."""
    labels = ["positive", "neutral", "negative"]
    lines = [f"{r['sentence']}@{r['label']}" for r in SENTIMENT]
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        kind = draw(st.sampled_from(["label", "no @", "blank", "odd bytes", "huge"]))
        if kind == "label":
            lines[i] = lines[i].rpartition("@")[0] + "@" + draw(st.sampled_from([*labels, "bullish", "", " neutral "]))
        elif kind == "no @":
            lines[i] = lines[i].replace("@", " ")
        elif kind == "blank":
            lines.insert(i, draw(st.sampled_from(["", " ", "\r"])))
        elif kind == "odd bytes":
            lines[i] = "\x85\x1c\x0b\x0c " + lines[i]
        else:
            lines[i] = "x" * 200_000 + lines[i]
    data = "\r\n".join(lines).encode("latin-1", errors="replace")
    return draw(corrupted(data)) if _one_in(draw, 3) else data


# --- independent readings of the inputs: what a successful run must have written ----------------


def _jsonl_records(data: bytes) -> list:
    """The input's records as plain `json` reads them (used only when fedllm accepted the file)."""
    records = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.removeprefix(codecs.BOM_UTF8) if number == 1 else raw
        if raw.strip(b" \t\r\n"):
            records.append(json.loads(raw.decode("utf-8")))
    return records


def _canonical(records: list) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True) for r in records)


def _written_records(counts: Accounting) -> list:
    records = []
    for path, n in counts.wrote.items():
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        assert len(lines) == n, f"{path}: {len(lines)} lines, the output says {n}"
        records += [json.loads(line) for line in lines]
    return records


def _blank(value) -> bool:
    return not (value or "").strip()


def _check_sft_output(outcome: Outcome, expected_pairs: int) -> None:
    counts = accounting(outcome.out)
    assert counts.balanced(), outcome.out
    pairs = _written_records(counts)
    assert len(pairs) == expected_pairs, outcome.out
    assert all(set(p) == {"input", "output"} and p["input"] and p["output"] for p in pairs)


def _run(args: list, out: Path) -> Outcome:
    """Run with an earlier output in place: a failed run must keep it; no run leaves a temp file."""
    before = snapshot(out)
    outcome = run_cli(args)
    assert_clean(outcome)
    event(f"exit {outcome.code}")
    assert_no_partial_output(outcome, out, before)
    assert not temp_leftovers(out.parent), temp_leftovers(out.parent)
    return outcome


def _earlier_output(out: Path, name: str) -> None:
    out.mkdir(parents=True)
    (out / name).write_text('{"earlier": "run"}\n')


# --- the commands ---------------------------------------------------------------------------------


@FUZZ_SETTINGS
@given(data=jsonl_bytes(SENTIMENT), num_sites=st.integers(1, 4), alpha=st.none() | st.sampled_from([0.3, 5.0]))
def test_split(data: bytes, num_sites: int, alpha: float | None) -> None:
    with _workdir() as root:
        (root / "train.jsonl").write_bytes(data)
        _earlier_output(root / "sites", "site-1.jsonl")
        args = ["data", "split", "--input", root / "train.jsonl", "--num-sites", num_sites, "--out", root / "sites"]
        outcome = _run(args + (["--alpha", alpha] if alpha else []), root / "sites")
        if outcome.code == 0:
            counts = accounting(outcome.out)
            expected = _jsonl_records(data)
            assert list(counts.read.values()) == [len(expected)] and counts.balanced(), outcome.out
            assert _canonical(_written_records(counts)) == _canonical(expected)


@FUZZ_SETTINGS
@given(first=jsonl_bytes(SENTIMENT), second=jsonl_bytes(SENTIMENT))
def test_combine(first: bytes, second: bytes) -> None:
    with _workdir() as root:
        (root / "a.jsonl").write_bytes(first)
        (root / "b.jsonl").write_bytes(second)
        _earlier_output(root / "out", "all.jsonl")
        outcome = _run(["data", "combine", root / "a.jsonl", root / "b.jsonl", "--out", root / "out" / "all.jsonl"],
                       root / "out")  # fmt: skip
        if outcome.code == 0:
            counts = accounting(outcome.out)
            expected = _jsonl_records(first) + _jsonl_records(second)
            assert sum(counts.read.values()) == len(expected) and counts.balanced(), outcome.out
            assert _canonical(_written_records(counts)) == _canonical(expected)


@FUZZ_SETTINGS
@given(data=jsonl_bytes(DOLLY))
def test_sft_dolly(data: bytes) -> None:
    with _workdir() as root:
        (root / "dolly.jsonl").write_bytes(data)
        _earlier_output(root / "out", "training.jsonl")
        outcome = _run(["data", "sft", "--format", "dolly", "--input", root / "dolly.jsonl", "--out", root / "out"],
                       root / "out")  # fmt: skip
        if outcome.code == 0:
            records = _jsonl_records(data)
            assert list(accounting(outcome.out).read.values()) == [len(records)]
            kept = [r for r in records if not _blank(r["instruction"]) and not _blank(r["response"])]
            _check_sft_output(outcome, len(kept))


@FUZZ_SETTINGS
@given(data=alpaca_parquet())
def test_sft_alpaca(data: bytes) -> None:
    with _workdir() as root:
        (root / "alpaca.parquet").write_bytes(data)
        _earlier_output(root / "out", "training.jsonl")
        outcome = _run(["data", "sft", "--format", "alpaca", "--input", root / "alpaca.parquet", "--out",
                        root / "out"], root / "out")  # fmt: skip
        if outcome.code == 0:
            rows = pq.read_table(io.BytesIO(data)).to_pylist()
            assert list(accounting(outcome.out).read.values()) == [len(rows)]
            _check_sft_output(outcome, sum(not _blank(r["instruction"]) and not _blank(r["output"]) for r in rows))


def _oasst1_pairs(rows: list[dict]) -> int:
    """The seed's rule, read off the table: rank-0 English replies, with text, to a prompter message with text."""
    by_id = {r["message_id"]: r for r in rows if r["message_id"] is not None}
    return sum(
        1
        for r in rows
        if r["role"] == "assistant"
        and r["parent_id"] is not None
        and (parent := by_id.get(r["parent_id"])) is not None
        and parent["role"] == "prompter"
        and r["rank"] == 0
        and r["lang"] == "en"
        and not _blank(r["text"])
        and not _blank(parent["text"])
    )


@FUZZ_SETTINGS
@given(data=oasst1_parquet())
def test_sft_oasst1(data: bytes) -> None:
    with _workdir() as root:
        (root / "oasst.parquet").write_bytes(data)
        _earlier_output(root / "out", "training.jsonl")
        outcome = _run(["data", "sft", "--format", "oasst1", "--input", root / "oasst.parquet", "--out",
                        root / "out"], root / "out")  # fmt: skip
        if outcome.code == 0:
            rows = pq.read_table(io.BytesIO(data)).to_pylist()
            counts = accounting(outcome.out)
            assert list(counts.read.values()) == [len(rows)]
            assert list(counts.context.values()) == [sum(r["role"] == "prompter" for r in rows)]
            _check_sft_output(outcome, _oasst1_pairs(rows))


@FUZZ_SETTINGS
@given(data=phrasebank_bytes())
def test_fpb(data: bytes) -> None:
    with _workdir() as root:
        (root / "raw").mkdir()
        (root / "raw" / "Sentences_50Agree.txt").write_bytes(data)
        _earlier_output(root / "out", "financial_phrase_bank_train.jsonl")
        outcome = _run(["data", "fpb", "--raw", root / "raw", "--out", root / "out"], root / "out")
        if outcome.code == 0:
            lines = [line.removesuffix("\r") for line in data.decode("latin-1").split("\n")]
            sentences = [line.rpartition("@")[0].strip() for line in lines if line.strip()]
            counts = accounting(outcome.out)
            assert list(counts.read.values()) == [len(sentences)] and counts.balanced(), outcome.out
            assert sorted(r["sentence"] for r in _written_records(counts)) == sorted(sentences)
