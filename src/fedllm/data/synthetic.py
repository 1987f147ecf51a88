"""A small synthetic financial-sentiment corpus (FPB-like sentences) for the demo and tests.

The label follows from the sentence's wording (rose/fell/announced...), as in Financial PhraseBank,
so a model can learn it; companies, numbers and phrasings vary so sentences rarely repeat.
`pretraining_texts` gives the same kind of text as a base model's pretraining would: half of the
sentences go on with a comment ("the outlook is good .") that ties the wording to a meaning, in
other words than the labels,
and unrelated "sentiment: <label>" lines teach the answer format. The pretrained model thus knows
what sentences mean but not the task's prompt/answer mapping: that is what p-tuning has to learn.
"""

from __future__ import annotations

import random

from fedllm.data.fpb import LABELS, TASKNAME

COMPANIES = [
    "Nordia", "Kestrel Oyj", "Baltic Steel", "Aurora Foods", "Finnpulp", "Helmi Bank", "Vexo Telecom", "Lumen Energy",
    "Sarka Group", "Polar Retail", "Tamro Media", "Orion Tech", "Ferrum Mining", "Kivi Paper", "Aalto Motors",
]  # fmt: skip
METRICS = ["net sales", "operating profit", "revenue", "earnings per share", "order intake", "cash flow", "margin"]
PERIODS = ["the first quarter", "the second quarter", "the third quarter", "the full year", "the first nine months"]

TEMPLATES = {
    "positive": [
        "{co} said its {metric} rose by {n} % in {period} .",
        "{co} {metric} increased to EUR {m} mn from EUR {m2} mn .",
        "{co} shares gained {n} % after strong {metric} .",
        "{co} won a new contract worth EUR {m} mn .",
        "{co} improved its {metric} in {period} , beating expectations .",
        "{co} expects its {metric} to grow in {period} .",
    ],
    "negative": [
        "{co} said its {metric} fell by {n} % in {period} .",
        "{co} {metric} decreased to EUR {m} mn from EUR {m2} mn .",
        "{co} shares dropped {n} % after weak {metric} .",
        "{co} will cut {n} jobs due to falling demand .",
        "{co} reported an operating loss in {period} , missing expectations .",
        "{co} warned that its {metric} will decline in {period} .",
    ],
    "neutral": [
        "{co} will publish its {metric} report for {period} on Tuesday .",
        "The agreement of {co} is valid for {n} years .",
        "{co} is headquartered in Helsinki and employs {n} people .",
        "{co} held its annual general meeting in {period} .",
        "{co} appointed a new chief financial officer .",
        "The products of {co} are sold in {n} countries .",
    ],
}
OUTLOOK = {"positive": "positive", "negative": "negative", "neutral": "neutral"}
COMMENTS = ["the outlook is {label} .", "analysts see this as {label} .", "the news is {label} ."]


def sentence(label: str, rng: random.Random) -> str:
    template = rng.choice(TEMPLATES[label])
    m = rng.randint(10, 900)
    return template.format(
        co=rng.choice(COMPANIES),
        metric=rng.choice(METRICS),
        period=rng.choice(PERIODS),
        n=rng.randint(2, 60),
        m=m,
        m2=max(1, m + rng.randint(-200, 200)),
    )


def sentiment_records(n: int, seed: int = 0, weights: tuple[float, ...] = (1, 1, 1)) -> list[dict[str, str]]:
    """n labeled records {"taskname", "sentence", "label"} (the FPB jsonl format)."""
    rng = random.Random(seed)
    labels = rng.choices(LABELS, weights=weights, k=n)
    return [{"taskname": TASKNAME, "sentence": sentence(label, rng), "label": label} for label in labels]


def pretraining_texts(n: int, seed: int = 0) -> list[str]:
    """Sentences (half with an "outlook" comment) plus answer-format lines unrelated to any sentence."""
    rng = random.Random(seed + 7919)
    texts = []
    for _ in range(n):
        label = rng.choice(LABELS)
        text = sentence(label, rng)
        comment = rng.choice(COMMENTS).format(label=OUTLOOK[label])
        texts.append(f"{text} {comment}" if rng.random() < 0.5 else text)
    rng.shuffle(texts)
    return texts


def skewed_site_records(num_sites: int, per_site: int, majority: float = 0.7, seed: int = 0) -> list[list[dict]]:
    """Per-site training sets of equal size where site i holds mostly label i mod 3 (the demo's label skew)."""
    sites = []
    for i in range(num_sites):
        weights = [(1 - majority) / (len(LABELS) - 1)] * len(LABELS)
        weights[i % len(LABELS)] = majority
        sites.append(sentiment_records(per_site, seed=seed * 100 + i + 11, weights=tuple(weights)))
    return sites
