"""Split one training file over N sites: evenly at random, or label-skewed with Dirichlet(alpha).

Even (default): a seeded shuffle cut into N near-equal parts, as the seeds' split script does.
Label skew (--alpha): for each label, the share each site gets is drawn from Dirichlet(alpha);
small alpha → each site holds mostly a few labels (the case where FedAvg beats training alone).
Every site gets at least `min_per_site` records. The validation set is not split: every site
validates on the same file so curves compare.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from fedllm.data.io import DataError, read_jsonl, write_jsonl_files


def even_split(records: list[dict[str, Any]], num_sites: int, seed: int) -> list[list[dict[str, Any]]]:
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    return [shuffled[i::num_sites] for i in range(num_sites)]


def dirichlet_split(
    records: list[dict[str, Any]], num_sites: int, alpha: float, seed: int, min_per_site: int = 1, label_key="label"
) -> list[list[dict[str, Any]]]:
    """Label-skewed split; redraws (up to 100 times) until every site has `min_per_site` records."""
    if alpha <= 0:
        raise DataError(f"--alpha {alpha} must be > 0 (small, e.g. 0.3: strong skew; large, e.g. 100: nearly even)")
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


def split_file(
    input_path: Path,
    num_sites: int,
    out_dir: Path,
    *,
    alpha: float | None = None,
    seed: int = 0,
    min_per_site: int = 1,
    prefix: str = "site-",
) -> tuple[dict[Path, int], list[Counter]]:
    """Write <prefix>1.jsonl … <prefix>N.jsonl; returns (records per file, label counts per site)."""
    if num_sites < 1:
        raise DataError(f"--num-sites {num_sites} must be at least 1")
    records = read_jsonl(input_path)
    if len(records) < num_sites:
        raise DataError(f"{input_path} has {len(records)} records, fewer than {num_sites} sites; use fewer sites")
    if alpha is None:
        parts = even_split(records, num_sites, seed)
    else:
        unlabeled = next((i for i, r in enumerate(records, start=1) if "label" not in r), None)
        if unlabeled is not None:
            raise DataError(
                f"{input_path}:{unlabeled}: --alpha splits by the 'label' field, which this record lacks; "
                "drop --alpha for an even split"
            )
        parts = dirichlet_split(records, num_sites, alpha, seed, min_per_site)
    files = {out_dir / f"{prefix}{i + 1}.jsonl": part for i, part in enumerate(parts)}
    counts = write_jsonl_files(files)
    labels = [Counter(str(r.get("label", "-")) for r in part) for part in parts]
    return counts, labels
