"""`fedllm report`: validation curves of local, centralized and FedAvg runs in one PNG + a markdown table.

Reads what a downloaded job result holds (fedllm.results.metrics): round_metrics.jsonl for the
global model each site received in each round (global_val_*), the sites' metrics after local
training from round_metrics.jsonl or, where the sites' trainer streams them instead (Hugging Face
SFT/LoRA), from the server's TensorBoard events, and the final global model's evaluation by every
site (cross_site_val/). Rounds are numbered as NVFlare and the console number them, from 0; the
final global model (what round R would receive) is drawn at x = R. Classification runs report
accuracy and macro-F1.

Nothing is dropped silently: a damaged line of round_metrics.jsonl, or a metric value that is not a
number, is left out and listed (line, reason) in the report's warnings, printed and in report.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedllm.errors import FedllmError
from fedllm.fileio import atomic_path
from fedllm.results.metrics import (
    REDOWNLOAD,
    ROUND_METRICS,
    event_file_damage,
    load_round_metrics,
    read_final_evaluation,
    read_site_scalars,
)
from fedllm.training.dp import METRIC_NAMES as DP_METRICS


class ReportError(FedllmError):
    """A run directory cannot be reported on."""


@dataclass
class Report:
    png: Path
    markdown: Path
    table: str
    warnings: list[str] = field(default_factory=list)  # what was left out of which run, and why


@dataclass
class RunCurves:
    """One run's numbers for the report; x is always the 0-based round."""

    metric: str  # val_accuracy or val_loss
    rounds: int
    received: list[tuple[int, float]]  # (round, mean over sites of global_<metric>): the model sites received
    after_training: list[tuple[int, float]]  # (round, mean over sites of <metric> after local training)
    per_site: dict[str, float]  # each site's <metric> after its last round
    final: dict[str, float] = field(default_factory=dict)  # the final global model: {metric: mean over sites}
    skipped: list[str] = field(default_factory=list)  # what the numbers above leave out, and why
    # A --dp run: each site's dp_* metrics after its last round (ε spent, δ, σ, q, steps), else empty.
    privacy: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def headline(self) -> float | None:
        """The run's result: the final global model's metric, else the mean over sites after training."""
        if self.metric in self.final:
            return self.final[self.metric]
        return self.after_training[-1][1] if self.after_training else None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _after_training_from_streams(result_dir: Path, metric: str) -> dict[str, list[float]]:
    """{site: [metric after round 0, after round 1, ...]} from the server's TensorBoard events."""
    return {
        site: [v for _, v in tags[metric]] for site, tags in read_site_scalars(result_dir).items() if metric in tags
    }


def _number(value: object) -> float | None:
    """A metric value the report can draw (the file's metrics are finite; text and booleans are not numbers)."""
    return None if isinstance(value, bool) or not isinstance(value, int | float) else float(value)


def run_curves(result_dir: Path) -> RunCurves:
    metrics = load_round_metrics(result_dir)
    if metrics is not None and not metrics.rounds:
        what = metrics.damage_summary() if metrics.damaged else "the file is empty"
        raise ReportError(f"{metrics.path} holds no usable round: {what}. Fix: {REDOWNLOAD}")
    if metrics is None or not metrics.rounds:
        raise ReportError(
            f"{result_dir} has no round metrics ({ROUND_METRICS}); pass the folder "
            "`fedllm job submit --download` wrote for a finished job"
        )
    rounds = metrics.rounds
    skipped = [f"{metrics.path}: {metrics.damage_summary()}"] if metrics.damaged else []
    if metrics.nvflare_skipped:
        skipped.append(f"{metrics.path}: NVFlare's writer left out {metrics.nvflare_skipped} metrics (skipped_metrics)")
    names = set().union(*(r["aggregated"] for r in rounds), *(m for r in rounds for m in r["sites"].values()))
    metric = "val_accuracy" if {"val_accuracy", "global_val_accuracy"} & names else "val_loss"

    def numbers(rnd: dict, name: str, where: dict, who: str) -> float | None:
        if name not in where:
            return None
        value = _number(where[name])
        if value is None:
            skipped.append(f"{metrics.path}: round {rnd['round']}: {who} {name} is {where[name]!r}, not a number")
        return value

    received, after = [], []
    for r in rounds:
        if (value := numbers(r, f"global_{metric}", r["aggregated"], "aggregated")) is not None:
            received.append((r["round"], value))
        if (value := numbers(r, metric, r["aggregated"], "aggregated")) is not None:
            after.append((r["round"], value))
    last = rounds[-1]
    per_site = {
        site: value for site, m in last["sites"].items() if (value := numbers(last, metric, m, site)) is not None
    }
    if not after:  # the sites streamed their after-training evaluation instead (NVFlare's HF integration)
        streams = _after_training_from_streams(result_dir, metric)
        skipped.extend(event_file_damage(result_dir))
        if streams:
            count = min(len(v) for v in streams.values())
            after = [(r, _mean([v[r] for v in streams.values()])) for r in range(count)]
            per_site = {site: values[count - 1] for site, values in streams.items()}
    final_by_site = read_final_evaluation(result_dir)
    final: dict[str, float] = {}
    for name in ("val_accuracy", "val_macro_f1", "val_loss"):
        values = [m[f"global_{name}"] for m in final_by_site.values() if f"global_{name}" in m]
        if values:
            final[name] = _mean(values)
    privacy = {
        site: dp
        for site, m in last["sites"].items()
        if (dp := {k: v for k in DP_METRICS if k in m and (v := numbers(last, k, m, site)) is not None})
    }
    # Rounds run, from the last round's number: a damaged line in between leaves the count as it was.
    return RunCurves(metric, last["round"] + 1, received, after, per_site, final, skipped, privacy)


def privacy_line(label: str, c: RunCurves) -> str | None:
    """A --dp run's privacy, as the report states it: the ε each site spent at the job's δ, and with what."""
    if not c.privacy:
        return None
    first = next(iter(c.privacy.values()))
    spent = ", ".join(f"{s} ε={m.get('dp_epsilon', float('nan')):.3f}" for s, m in sorted(c.privacy.items()))
    return (
        f"{label}: DP-SGD after {c.rounds} round(s): {spent} at δ={first.get('dp_delta', float('nan')):g} "
        f"(σ={first.get('dp_noise_multiplier', float('nan')):.4g}, q={first.get('dp_sample_rate', float('nan')):g}, "
        f"{first.get('dp_steps_total', float('nan')):.0f} steps; RDP accountant)"
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def write_report(runs: dict[str, Path], out_dir: Path, title: str = "validation") -> Report:
    """Draw every run's curves into out_dir/report.png and write out_dir/report.md; returns both paths."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    loaded = {label: run_curves(Path(path)) for label, path in runs.items()}
    classification = any(c.metric == "val_accuracy" for c in loaded.values())
    lines = [
        "| run | metric | rounds | final global model | + macro-F1 | best received (round) | "
        "mean over sites after training | per site |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    last_x = max(c.rounds for c in loaded.values())
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"] * 9
    for (label, c), color in zip(loaded.items(), colors, strict=False):
        if c.rounds == 1 and not c.final:  # local-only: each site alone for as many epochs as the others
            if c.after_training:
                ax.axhline(c.after_training[-1][1], color=color, linestyle="--", label=f"{label}: mean over sites")
            ax.scatter([last_x] * len(c.per_site), list(c.per_site.values()), color=color, marker="x",
                       label=f"{label}: each site")  # fmt: skip
        else:
            if c.after_training:
                xs, ys = zip(*c.after_training, strict=True)
                ax.plot(xs, ys, color=color, marker="o", alpha=0.45, label=f"{label}: sites after local training")
            if c.received:
                xs, ys = zip(*c.received, strict=True)
                ax.plot(xs, ys, color=color, marker="s", linewidth=2, label=f"{label}: global model received")
            if c.metric in c.final:
                ax.scatter([c.rounds], [c.final[c.metric]], color=color, marker="*", s=180, zorder=5,
                           label=f"{label}: final global model {c.final[c.metric]:.3f}")  # fmt: skip
                if c.received:
                    ax.plot([c.received[-1][0], c.rounds], [c.received[-1][1], c.final[c.metric]], color=color,
                            linewidth=2, linestyle=":")  # fmt: skip
        pick = max if c.metric == "val_accuracy" else min
        # A local-only run's one "received" model is the untrained initial one: no best to speak of.
        best = pick(c.received, key=lambda rv: rv[1]) if c.received and c.rounds > 1 else None
        best_cell = f"{best[1]:.3f} ({best[0]})" if best else "-"
        per_site = ", ".join(f"{s} {v:.3f}" for s, v in sorted(c.per_site.items()))
        after = c.after_training[-1][1] if c.after_training else None
        lines.append(
            f"| {label} | {c.metric} | {c.rounds} | {_fmt(c.final.get(c.metric))} | "
            f"{_fmt(c.final.get('val_macro_f1')) if classification else '-'} | {best_cell} | {_fmt(after)} | "
            f"{per_site or '-'} |"
        )
    if last_x <= 30:
        ax.set_xticks(range(last_x + 1))
        ax.set_xticklabels([*map(str, range(last_x)), f"{last_x}\n(final)"])
    else:  # one tick per round would be unreadable
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("validation " + ("accuracy" if classification else "loss"))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    png, markdown = out_dir / "report.png", out_dir / "report.md"
    dp_lines = [line for label, c in loaded.items() if (line := privacy_line(label, c))]
    if dp_lines:
        lines += ["", "Differential privacy (record level, per site):", "", *(f"- {line}" for line in dp_lines)]
    table = "\n".join(lines) + "\n"
    warnings = [f"{label}: {note}" for label, c in loaded.items() for note in c.skipped]
    left_out = "".join(f"- {w}\n" for w in warnings)
    text = f"# {title}\n\n![curves](report.png)\n\n{table}" + (f"\n## Left out\n\n{left_out}" if warnings else "")
    # Both files or neither: each is written beside its place, and both renamed only once both are whole.
    with atomic_path(png) as png_temp, atomic_path(markdown) as markdown_temp:
        png_temp.write_bytes(buffer.getvalue())
        markdown_temp.write_text(text, encoding="utf-8")
    return Report(png, markdown, table, warnings)
