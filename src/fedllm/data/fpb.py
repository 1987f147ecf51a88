"""Financial PhraseBank v1.0 → the jsonl NeMo's prompt-learning preprocessing writes.

The extracted archive holds Sentences_50Agree.txt, _66Agree, _75Agree and _AllAgree (ISO-8859-1,
one `sentence@label` per line); each file keeps the sentences at least that share of annotators
agreed on. Output: financial_phrase_bank_{train,val,test}.jsonl with
{"taskname": "sentiment", "sentence": ..., "label": ...} (seeded shuffle, 80/10/10 by default).
"""

from __future__ import annotations

import random
from pathlib import Path

from fedllm.data.io import DataError, Prepared, SourceReport, require_output_folder, write_jsonl_files

LABELS = ("positive", "neutral", "negative")
AGREEMENTS = {"50": "Sentences_50Agree.txt", "66": "Sentences_66Agree.txt", "75": "Sentences_75Agree.txt",
              "all": "Sentences_AllAgree.txt"}  # fmt: skip
TASKNAME = "sentiment"


def read_phrasebank(path: Path) -> list[dict[str, str]]:
    """Parse one Sentences_*Agree.txt file (the label follows the last '@'); every line is a sentence or an error.

    Lines end at "\\n" (and "\\r\\n") only: str.splitlines would also cut at bytes such as 0x85 or 0x1c,
    which ISO-8859-1 text may hold inside a sentence.
    """
    if not path.is_file():
        raise DataError(
            f"{path} not found; pass --raw the extracted FinancialPhraseBank-v1.0 folder "
            f"(it holds {', '.join(AGREEMENTS.values())})"
        )
    records = []
    try:
        text = path.read_bytes().decode("iso-8859-1")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}; check its permissions") from exc
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        sentence, sep, label = line.rpartition("@")
        label = label.strip()
        if not sep or not sentence.strip():
            raise DataError(f"{path}:{number}: expected 'sentence@label', got {line[:60]!r}; fix or remove the line")
        if label not in LABELS:
            raise DataError(
                f"{path}:{number}: unknown label {label[:40]!r}; Financial PhraseBank labels are {', '.join(LABELS)}"
            )
        records.append({"taskname": TASKNAME, "sentence": sentence.strip(), "label": label})
    if not records:
        raise DataError(f"{path} holds no sentences")
    return records


def split_fractions(n: int, fractions: tuple[float, float, float]) -> tuple[int, int]:
    """Boundaries (end of train, end of val) for n records; val and test get at least one if asked for."""
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise DataError(f"split fractions {fractions} must be non-negative and sum to 1 (e.g. 0.8 0.1 0.1)")
    val = max(1, round(n * fractions[1])) if fractions[1] > 0 else 0
    test = max(1, round(n * fractions[2])) if fractions[2] > 0 else 0
    if n - val - test < 1:
        raise DataError(f"{n} records are too few for a train/val/test split; need at least {val + test + 1}")
    return n - val - test, n - test


def prepare_fpb(
    raw_dir: Path, out_dir: Path, agreement: str = "50", seed: int = 0, fractions=(0.8, 0.1, 0.1)
) -> Prepared:
    """Write financial_phrase_bank_{train,val,test}.jsonl; every sentence read is written (none is skipped)."""
    if agreement not in AGREEMENTS:
        raise DataError(f"agreement level {agreement!r} unknown; use one of {', '.join(AGREEMENTS)}")
    if not raw_dir.is_dir():
        raise DataError(f"--raw {raw_dir} is not a directory; extract FinancialPhraseBank-v1.0.zip and pass its folder")
    require_output_folder(out_dir)
    source = raw_dir / AGREEMENTS[agreement]
    records = read_phrasebank(source)
    random.Random(seed).shuffle(records)
    train_end, val_end = split_fractions(len(records), fractions)
    written = write_jsonl_files(
        {
            out_dir / "financial_phrase_bank_train.jsonl": records[:train_end],
            out_dir / "financial_phrase_bank_val.jsonl": records[train_end:val_end],
            out_dir / "financial_phrase_bank_test.jsonl": records[val_end:],
        }
    )
    return Prepared(written, [SourceReport(source, "sentences", read=len(records), kept=len(records))])
