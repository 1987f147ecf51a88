"""Issue 28 for the data commands: nothing dropped unsaid, no traceback, outputs every user can read.

Each test runs `fedllm data ...` as a user does (in this process) and checks what it printed, what it
wrote and what it left: every skipped item reported with its reason and count (read = context + skipped
+ written), a file that yields nothing refused, bad input stopped with one `error:` line that names the
file (and line or field) and the fix, and nothing half-written.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedllm.data.synthetic import sentiment_records
from tests.support.cli_fuzz import Outcome, assert_clean, assert_no_partial_output, run_cli, snapshot
from tests.support.data_report import accounting


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # the commands print paths relative to here


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _lines(outcome: Outcome) -> list[str]:
    return [line for line in outcome.out.splitlines() if line.startswith(("read ", "skipped ", "wrote ", "note:"))]


def _error(outcome: Outcome) -> str:
    assert_clean(outcome, allowed=(1,))
    assert len(outcome.err.strip().splitlines()) == 1, outcome.err  # one line: what, where, the fix
    return outcome.err.strip()


def _alpaca_30_rows(path: Path) -> Path:
    """30 rows of which 6 have no output (null, "", blank) and 4 no instruction: 20 examples."""
    instruction = [f"Say {i}" for i in range(30)]
    output = [f"out {i}" for i in range(30)]
    for i, empty in enumerate([None, "", "  ", None, "\n", ""]):
        output[i] = empty
    for i, empty in zip(range(6, 10), [None, "", None, " "], strict=True):
        instruction[i] = empty
    pq.write_table(pa.table({"instruction": instruction, "input": [""] * 30, "output": output}), path)
    return path


def test_sft_reports_every_skipped_example_with_its_reason() -> None:
    outcome = run_cli(["data", "sft", "--format", "alpaca", "--input", _alpaca_30_rows(Path("alpaca.parquet")),
                       "--out", "out"])  # fmt: skip
    assert_clean(outcome, allowed=(0,))
    assert _lines(outcome) == [
        "read alpaca.parquet: 30 rows",
        "skipped 10 of the 30 rows of alpaca.parquet: 6 with empty output, 4 with empty instruction",
        "wrote out/training.jsonl (16 records)",
        "wrote out/validation.jsonl (2 records)",
        "wrote out/testing.jsonl (2 records)",
    ]
    written = [json.loads(line) for name in ("training", "validation", "testing")
               for line in Path(f"out/{name}.jsonl").read_text().splitlines()]  # fmt: skip
    assert sorted(r["output"] for r in written) == sorted(f"out {i}" for i in range(10, 30))


def test_dolly_null_fields_are_skipped_and_reported_wrong_types_are_errors() -> None:
    records = [{"instruction": f"Q{i}", "context": None, "response": f"A{i}", "category": "qa"} for i in range(30)]
    for i in range(5):
        records[i]["response"] = None  # a traceback on main
    for i in range(5, 9):
        records[i]["response"] = ""
    records[9]["instruction"] = None
    _jsonl(Path("dolly.jsonl"), records)
    outcome = run_cli(["data", "sft", "--format", "dolly", "--input", "dolly.jsonl", "--out", "out"])
    assert_clean(outcome, allowed=(0,))
    assert _lines(outcome)[:2] == [
        "read dolly.jsonl: 30 records",
        "skipped 10 of the 30 records of dolly.jsonl: 9 with empty response, 1 with empty instruction",
    ]
    assert accounting(outcome.out).balanced() and sum(accounting(outcome.out).wrote.values()) == 20

    records[12]["response"] = 42
    Path("dolly.jsonl").write_text("\n" + "".join(json.dumps(r) + "\n" for r in records))  # record 13 on line 14
    assert _error(run_cli(["data", "sft", "--format", "dolly", "--input", "dolly.jsonl", "--out", "other"])) == (
        "error: dolly.jsonl:14: field 'response' is int, not text; "
        "Dolly's instruction, context and response are strings"
    )
    assert not Path("other").exists()


def _oasst(path: Path, rows: list[tuple]) -> Path:
    columns = ["message_id", "parent_id", "role", "text", "lang", "rank"]
    pq.write_table(pa.table({c: [r[i] for r in rows] for i, c in enumerate(columns)}), path)
    return path


def test_oasst1_reports_the_replies_it_leaves_out() -> None:
    rows = [
        ("p1", None, "prompter", "Hi?", "en", None),
        ("a1", "p1", "assistant", "Hello.", "en", 0.0),
        ("a2", "p1", "assistant", "Hey.", "en", 1.0),  # lower-ranked
        ("a3", "p1", "assistant", "Yo.", "en", None),  # unranked
        ("a4", "gone", "assistant", "Orphan.", "en", 0.0),  # its prompt is not in the file
        ("p2", None, "prompter", "Hallo?", "de", None),
        ("a5", "p2", "assistant", "Guten Tag.", "de", 0.0),
        ("p3", "a1", "prompter", "And you?", "en", None),
        ("a6", "p3", "assistant", "Fine.", "en", 0.0),
        ("p4", None, "prompter", "Why?", "en", None),
        ("a7", "p4", "assistant", "Because.", "en", 0.0),
        ("a8", "a7", "assistant", "Also.", "en", 0.0),  # replies to an assistant
    ]
    outcome = run_cli(["data", "sft", "--format", "oasst1", "--input", _oasst(Path("oasst.parquet"), rows),
                       "--out", "out"])  # fmt: skip
    assert_clean(outcome, allowed=(0,))
    assert _lines(outcome)[:2] == [
        "read oasst.parquet: 12 messages, 4 of them prompter messages (the inputs of the replies)",
        "skipped 5 of the 12 messages of oasst.parquet: 1 not in lang en, 1 ranked below the best reply (rank > 0), "
        "1 replying to a message not in the file, 1 replying to a message that is not a prompter's, "
        "1 unranked (rank null)",
    ]
    assert accounting(outcome.out).balanced() and sum(accounting(outcome.out).wrote.values()) == 3


def test_a_file_that_yields_nothing_is_refused_even_beside_a_good_one() -> None:
    _alpaca_30_rows(Path("alpaca.parquet"))
    pq.write_table(pa.table({"instruction": ["a", "b"], "input": ["", ""], "output": [None, " "]}), "extra.parquet")
    outcome = run_cli(["data", "sft", "--format", "alpaca", "--input", "alpaca.parquet", "--validation",
                       "extra.parquet", "--out", "out"])  # fmt: skip
    assert _error(outcome) == (
        "error: extra.parquet: none of its 2 rows gives an example (2 with empty output); "
        "Alpaca rows need an instruction and an output"
    )
    assert not Path("out").exists()


def _fpb_raw(folder: Path, sentences: list[bytes]) -> Path:
    folder.mkdir()
    (folder / "Sentences_50Agree.txt").write_bytes(b"\r\n".join(sentences))
    return folder


@pytest.mark.parametrize("command", ["fpb", "split", "sft", "combine", "synthetic"])
def test_outputs_are_readable_by_other_users(command: str) -> None:
    """Containers run as uid 10001 with the data mounted read-only: under umask 022 files must be 0644."""
    labels = [b"positive", b"neutral", b"negative"]
    _fpb_raw(Path("raw"), [b"Sales rose %d %% .@%s" % (i, labels[i % 3]) for i in range(20)])
    _jsonl(Path("train.jsonl"), sentiment_records(20))
    _alpaca_30_rows(Path("alpaca.parquet"))
    args = {
        "fpb": ["--raw", "raw", "--out", "out"],
        "split": ["--input", "train.jsonl", "--num-sites", "2", "--out", "out"],
        "sft": ["--format", "alpaca", "--input", "alpaca.parquet", "--out", "out"],
        "combine": ["train.jsonl", "--out", "out/all.jsonl"],
        "synthetic": ["--out", "out", "--train", "10", "--val", "5"],
    }[command]
    old = os.umask(0o022)
    try:
        assert_clean(run_cli(["data", command, *args]), allowed=(0,))
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in Path("out").iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes


def _write_bad_inputs() -> None:
    _jsonl(Path("good.jsonl"), sentiment_records(6))
    dolly = b'"instruction": "q", "context": "", "response": "r"'
    Path("latin1.jsonl").write_bytes(b'{%s}\n{"sentence": "Oy \xc4bc", %s}\n' % (dolly, dolly))
    _alpaca_30_rows(Path("alpaca.parquet"))
    pq.write_table(pa.table({"instruction": ["a"] * 4, "input": [""] * 4, "output": [1, 2, 3, 4]}), "ints.parquet")
    Path("a_file").write_text("not a folder")
    Path("a_folder").mkdir()


BAD = {
    "split non-UTF-8": (
        ["split", "--input", "latin1.jsonl", "--num-sites", "1", "--out", "out"],
        "error: latin1.jsonl:2: not UTF-8 (byte 0xc4 at byte 18 of the line); "
        "jsonl files are UTF-8: convert it (e.g. iconv -f latin1 -t utf-8)",
    ),
    "combine non-UTF-8": (
        ["combine", "good.jsonl", "latin1.jsonl", "--out", "out/all.jsonl"],
        "error: latin1.jsonl:2: not UTF-8",
    ),
    "dolly non-UTF-8": (["sft", "--format", "dolly", "--input", "latin1.jsonl", "--out", "out"], "error: latin1.jsonl:2"),
    "split a parquet": (
        ["split", "--input", "alpaca.parquet", "--num-sites", "1", "--out", "out"],
        "error: alpaca.parquet is a parquet file, not jsonl (one JSON object per line); convert it first "
        "(Alpaca and OASST1 parquet: `fedllm data sft --format alpaca|oasst1`)",
    ),
    "combine a parquet": (["combine", "alpaca.parquet", "--out", "out/all.jsonl"], "error: alpaca.parquet is a parquet"),
    "dolly a parquet": (["sft", "--format", "dolly", "--input", "alpaca.parquet", "--out", "out"], "error: alpaca.parquet is a parquet"),
    "alpaca non-string column": (
        ["sft", "--format", "alpaca", "--input", "ints.parquet", "--out", "out"],
        "error: ints.parquet: column 'output' holds int64, not text; is this the alpaca dataset's file?",
    ),
    "fpb --out file": (
        ["fpb", "--raw", "raw", "--out", "a_file"],
        "error: --out a_file is a file; give a folder for the output files (it is created if missing)",
    ),
    "sft --out file": (["sft", "--format", "alpaca", "--input", "alpaca.parquet", "--out", "a_file"], "error: --out a_file is a file"),
    "split --out file": (["split", "--input", "good.jsonl", "--num-sites", "2", "--out", "a_file"], "error: --out a_file is a file"),
    "synthetic --out file": (["synthetic", "--out", "a_file"], "error: --out a_file is a file"),
    "synthetic --out below a file": (["synthetic", "--out", "a_file/sub"], "error: cannot write a_file/sub/synthetic_train.jsonl: a_file is a file"),
    "combine --out folder": (
        ["combine", "good.jsonl", "--out", "a_folder"],
        "error: --out a_folder is a folder; give the output file's path (e.g. a_folder/training.jsonl)",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_is_one_clear_error_and_leaves_nothing(case: str) -> None:
    _write_bad_inputs()
    labels = [b"positive", b"neutral", b"negative"]
    _fpb_raw(Path("raw"), [b"Sales rose %d %% .@%s" % (i, labels[i % 3]) for i in range(20)])
    args, expected = BAD[case]
    before = snapshot(Path.cwd())
    outcome = run_cli(["data", *args])
    assert _error(outcome).startswith(expected)
    assert_no_partial_output(outcome, Path.cwd(), before)


def test_split_names_the_line_after_blank_lines() -> None:
    Path("train.jsonl").write_text(
        '{"sentence": "a", "label": "x"}\n\n   \n{"sentence": "b", "label": "y"}\n{"sentence": "c"}\n'
    )
    outcome = run_cli(["data", "split", "--input", "train.jsonl", "--num-sites", "1", "--alpha", "1", "--out", "out"])
    assert _error(outcome).startswith("error: train.jsonl:5: --alpha splits by the 'label' field")


SFT_RECORD = '{"instruction": "a", "context": "", "response": "b"}'
REFUSED = {
    "split --alpha with a null label": (
        {"in.jsonl": ['{"s": 1, "label": "x"}', '{"s": 2, "label": null}']},
        ["split", "--input", "in.jsonl", "--num-sites", "1", "--alpha", "1", "--out", "out"],
        "error: in.jsonl:2: --alpha splits by the 'label' field, which this record lacks (or is null)",
    ),
    "split --alpha with a list label": (
        {"in.jsonl": ['{"s": 1, "label": "x"}', '{"s": 2, "label": ["x"]}']},
        ["split", "--input", "in.jsonl", "--num-sites", "1", "--alpha", "1", "--out", "out"],
        "error: in.jsonl:2: 'label' is a list; --alpha groups records by label, which must be a string or a number",
    ),
    "split --alpha nan": (
        {"in.jsonl": ['{"label": "x"}', '{"label": "y"}']},
        ["split", "--input", "in.jsonl", "--num-sites", "1", "--alpha", "nan", "--out", "out"],
        "error: --alpha nan must be a number > 0",
    ),
    "split over its own input": (
        {"site-1.jsonl": ['{"label": "x"}', '{"label": "y"}']},
        ["split", "--input", "site-1.jsonl", "--num-sites", "1", "--out", "."],
        "error: the output site-1.jsonl is the input site-1.jsonl: writing it would replace the input",
    ),
    "a field twice in one record": (
        {"in.jsonl": ['{"input": "a", "output": "b", "output": "c"}']},
        ["combine", "in.jsonl", "--out", "all.jsonl"],
        "error: in.jsonl:1: field 'output' appears twice in one record; keep one of them",
    ),
    "combine a file twice": (
        {"in.jsonl": ['{"input": "a", "output": "b"}']},
        ["combine", "in.jsonl", "../work/in.jsonl", "--out", "all.jsonl"],
        "error: ../work/in.jsonl is given twice (also as in.jsonl); give each file once",
    ),
    "combine into one of its inputs": (
        {"in.jsonl": ['{"input": "a", "output": "b"}'], "b.jsonl": ['{"input": "c", "output": "d"}']},
        ["combine", "in.jsonl", "b.jsonl", "--out", "in.jsonl"],
        "error: the output in.jsonl is the input in.jsonl: writing it would replace the input; choose another --out",
    ),
    "combine two formats": (
        {"in.jsonl": ['{"input": "a", "output": "b"}'], "fpb.jsonl": ['{"sentence": "s", "label": "neutral"}']},
        ["combine", "in.jsonl", "fpb.jsonl", "--out", "all.jsonl"],
        "error: fpb.jsonl's records have the fields label, sentence, in.jsonl's input, output: "
        "combine files of one format (e.g. every site's training.jsonl)",
    ),
    "sft --validation is --input": (
        {"in.jsonl": [SFT_RECORD] * 3},
        ["sft", "--format", "dolly", "--input", "in.jsonl", "--validation", "in.jsonl", "--out", "out"],
        "error: in.jsonl is given twice",
    ),
    "sft over its own input": (
        {"in_training.jsonl": [SFT_RECORD] * 3},
        ["sft", "--format", "dolly", "--input", "in_training.jsonl", "--name", "in", "--out", "."],
        "error: the output in_training.jsonl is the input in_training.jsonl",
    ),
    "a number too long to read": (
        {"in.jsonl": ['{"input": "a", "output": ' + "9" * 5000 + "}"]},
        ["combine", "in.jsonl", "--out", "all.jsonl"],
        "error: in.jsonl:1: not valid JSON (Exceeds the limit (4300 digits) for integer string conversion",
    ),
    "JSON nested too deep": (
        {"in.jsonl": ["[" * 100000 + "]" * 100000]},
        ["combine", "in.jsonl", "--out", "all.jsonl"],
        "error: in.jsonl:1: JSON nested too deeply to read",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_input_that_would_be_lost_or_corrupted_is_refused(case: str) -> None:
    files, args, expected = REFUSED[case]
    for name, lines in files.items():
        Path(name).write_text("\n".join(lines) + "\n")
    before = snapshot(Path.cwd())
    outcome = run_cli(["data", *args])
    assert _error(outcome).startswith(expected)
    assert_no_partial_output(outcome, Path.cwd(), before)


def test_a_site_file_left_from_an_earlier_split_is_reported() -> None:
    _jsonl(Path("train.jsonl"), sentiment_records(30))
    assert_clean(
        run_cli(["data", "split", "--input", "train.jsonl", "--num-sites", "3", "--out", "sites"]), allowed=(0,)
    )
    outcome = run_cli(["data", "split", "--input", "train.jsonl", "--num-sites", "2", "--out", "sites"])
    assert_clean(outcome, allowed=(0,))
    assert _lines(outcome)[-1] == (
        "note: sites/site-3.jsonl is left from an earlier split into more sites, not one of these; "
        "remove it before using the folder's files"
    )
    assert accounting(outcome.out).balanced()


def test_records_are_written_as_read() -> None:
    """A string that is not valid Unicode (a \\ud800 escape) was a traceback; a bare 0x85 cut an FPB sentence,
    and written raw (a line end to str.splitlines) it cut a line of the output."""
    Path("in.jsonl").write_text('{"input": "\\ud800 half a pair", "output": "\\u00e9 \\u2028 1e400"}\n')
    assert_clean(run_cli(["data", "combine", "in.jsonl", "--out", "all.jsonl"]), allowed=(0,))
    assert Path("all.jsonl").read_bytes() == Path("in.jsonl").read_bytes()  # the escapes kept
    labels = [b"positive", b"neutral", b"negative"]
    _fpb_raw(Path("raw"), [b"Sales \xe4 rose %d %% \x85 a lot .@%s" % (i, labels[i % 3]) for i in range(20)])
    outcome = run_cli(["data", "fpb", "--raw", "raw", "--out", "fpb"])
    assert_clean(outcome, allowed=(0,))
    lines = [line for f in Path("fpb").iterdir() for line in f.read_text(encoding="utf-8").splitlines()]
    sentences = [json.loads(line)["sentence"] for line in lines]
    assert len(sentences) == 20 and all(
        s.startswith("Sales \xe4 rose") and s.endswith("\x85 a lot .") for s in sentences
    )


def test_oasst1_ids_must_be_unique_and_a_nan_rank_is_unranked() -> None:
    rows = [("p1", None, "prompter", "Hi?", "en", None), ("a1", "p1", "assistant", "Hello.", "en", float("nan"))]
    rows += [(f"p{i}", None, "prompter", f"Q{i}", "en", None) for i in range(2, 6)]
    rows += [(f"a{i}", f"p{i}", "assistant", f"A{i}", "en", 0.0) for i in range(2, 6)]
    _oasst(Path("oasst.parquet"), rows)
    outcome = run_cli(["data", "sft", "--format", "oasst1", "--input", "oasst.parquet", "--out", "out"])
    assert_clean(outcome, allowed=(0,))
    assert "skipped 1 of the 10 messages of oasst.parquet: 1 unranked (rank null)" in _lines(outcome)
    _oasst(Path("twice.parquet"), [*rows, ("p2", None, "prompter", "Again?", "en", None)])
    outcome = run_cli(["data", "sft", "--format", "oasst1", "--input", "twice.parquet", "--out", "other"])
    assert _error(outcome).startswith("error: twice.parquet: message_id 'p2' is on more than one row")
