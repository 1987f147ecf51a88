"""Split one training file over N sites: evenly at random, or label-skewed with Dirichlet(alpha).

Even (default): a seeded shuffle cut into N near-equal parts, as the seeds' split script does.
Label skew (--alpha): for each label, the share each site gets is drawn from Dirichlet(alpha);
small alpha → each site holds mostly a few labels (the case where FedAvg beats training alone).
Every site gets at least `min_per_site` records. The validation set is not split: every site
validates on the same file so curves compare.

Every record of the input goes to exactly one site (none is dropped); a file left in the output folder
by an earlier split into more sites is reported (`Prepared.stale`), so nobody trains on it by mistake.
"""

from __future__ import annotations

import glob
import math
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from fedllm.data.io import (
    DataError,
    Prepared,
    read_jsonl_records,
    refuse_overwriting_inputs,
    require_output_folder,
    write_jsonl_files,
)

NO_LABEL = "(no label)"


def even_split(records: list[dict[str, Any]], num_sites: int, seed: int) -> list[list[dict[str, Any]]]:
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    return [shuffled[i::num_sites] for i in range(num_sites)]


def dirichlet_split(
    records: list[dict[str, Any]], num_sites: int, alpha: float, seed: int, min_per_site: int = 1, label_key="label"
) -> list[list[dict[str, Any]]]:
    """Label-skewed split; redraws (up to 100 times) until every site has `min_per_site` records."""
    if not (0 < alpha < math.inf):
        raise DataError(
            f"--alpha {alpha} must be a number > 0 (small, e.g. 0.3: strong skew; large, e.g. 100: nearly even)"
        )
    if num_sites * min_per_site > len(records):
        raise DataError(
            f"{len(records)} records cannot give {num_sites} sites {min_per_site} each; lower --min-per-site or --num-sites"
        )
    by_label: dict[Any, list[int]] = {}
    for index, record in enumerate(records):
        by_label.setdefault(record[label_key], []).append(index)
    rng = np.random.default_rng(seed)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_sites)]
        for label in sorted(by_label, key=str):
            indices = rng.permutation(by_label[label])
            shares = rng.dirichlet([alpha] * num_sites)
            cuts = (np.cumsum(shares)[:-1] * len(indices)).astype(int)
            for site, chunk in enumerate(np.split(indices, cuts)):
                parts[site] += chunk.tolist()
        if min(len(p) for p in parts) >= min_per_site:
            return [[records[i] for i in sorted(p)] for p in parts]
    raise DataError(
        f"no Dirichlet(alpha={alpha}) draw gave every site {min_per_site} records in 100 tries; "
        "raise --alpha or lower --min-per-site"
    )


def label_name(record: dict[str, Any]) -> str:
    """How the label table names a record's label (a long one cut to 30 characters)."""
    label = record.get("label")
    if label is None:
        return NO_LABEL
    text = label if isinstance(label, str) else repr(label)
    return text if len(text) <= 30 else text[:29] + "…"


def _check_labels(source) -> None:
    """--alpha groups records by label: every record needs one, a string or a number."""
    for number, record in source.numbered():
        label = record.get("label")
        if label is None:
            raise DataError(
                f"{source.path}:{number}: --alpha splits by the 'label' field, which this record lacks (or is null); "
                "drop --alpha for an even split"
            )
        if isinstance(label, (list, dict)):
            raise DataError(
                f"{source.path}:{number}: 'label' is a {'list' if isinstance(label, list) else 'JSON object'}; "
                "--alpha groups records by label, which must be a string or a number"
            )


def split_file(
    input_path: Path,
    num_sites: int,
    out_dir: Path,
    *,
    alpha: float | None = None,
    seed: int = 0,
    min_per_site: int = 1,
    prefix: str = "site-",
) -> tuple[Prepared, list[Counter]]:
    """Write <prefix>1.jsonl … <prefix>N.jsonl; returns (records per file and the input read, label counts per site)."""
    if num_sites < 1:
        raise DataError(f"--num-sites {num_sites} must be at least 1")
    require_output_folder(out_dir)
    outputs = [out_dir / f"{prefix}{i + 1}.jsonl" for i in range(num_sites)]
    refuse_overwriting_inputs(outputs, [input_path])
    source = read_jsonl_records(input_path)
    records = source.records
    if len(records) < num_sites:
        raise DataError(f"{input_path} has {len(records)} records, fewer than {num_sites} sites; use fewer sites")
    if alpha is None:
        parts = even_split(records, num_sites, seed)
    else:
        _check_labels(source)
        parts = dirichlet_split(records, num_sites, alpha, seed, min_per_site)
    written = write_jsonl_files(dict(zip(outputs, parts, strict=True)))
    labels = [Counter(label_name(r) for r in part) for part in parts]
    site_file = re.compile(rf"{re.escape(prefix)}[0-9]+\.jsonl")
    stale = sorted(
        p for p in out_dir.glob(f"{glob.escape(prefix)}*.jsonl") if p not in written and site_file.fullmatch(p.name)
    )
    return Prepared(written, [source.report()], stale), labels
