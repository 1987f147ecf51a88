"""`fedllm report`: validation curves of local, centralized and FedAvg runs in one PNG + a markdown table.

Reads what NVFlare's FedAvg recorded on the server (workspace/metrics/round_metrics.jsonl in a
downloaded job result). A FedAvg run gives one point per round (the global model each site
received, i.e. global_val_*, plus the last round's local models); a local or central run has one
round, drawn as one point per site.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedllm.errors import FedllmError
from fedllm.fileio import write_bytes
from fedllm.results.metrics import read_round_metrics


class ReportError(FedllmError):
    """A run directory cannot be reported on."""


@dataclass
class Report:
    png: Path
    markdown: Path
    table: str


def _metric(run_rounds: list[dict]) -> str:
    names = set().union(*(r["aggregated"] for r in run_rounds)) if run_rounds else set()
    return "val_accuracy" if "val_accuracy" in names else "val_loss"


def run_curves(result_dir: Path) -> tuple[str, dict[str, list[tuple[int, float]]], dict[str, float]]:
    """(metric, curves, final per-site values) of one run.

    curves["sites"]: mean over sites of the metric after local training, per round (x = rounds done);
    curves["global"]: the global model each site received (global_<metric>), x = aggregations before it.
    """
    rounds = read_round_metrics(result_dir)
    if not rounds:
        raise ReportError(
            f"{result_dir} has no round metrics (workspace/metrics/round_metrics.jsonl); pass the folder "
            "`fedllm job submit --download` wrote for a finished job"
        )
    metric = _metric(rounds)
    sites = [(r["round"] + 1, r["aggregated"][metric]) for r in rounds if metric in r["aggregated"]]
    glob = [(r["round"], r["aggregated"][f"global_{metric}"]) for r in rounds if f"global_{metric}" in r["aggregated"]]
    final = {site: m[metric] for site, m in rounds[-1]["sites"].items() if metric in m}
    return metric, {"sites": sites, "global": glob[1:]}, final  # round 0's "global" is the untrained init


def write_report(runs: dict[str, Path], out_dir: Path, title: str = "validation") -> Report:
    """Draw every run's curve into out_dir/report.png and write out_dir/report.md; returns both paths."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    lines = ["| run | metric | rounds | final: mean over sites (global model) | per site |", "|---|---|---|---|---|"]
    metric = "val_loss"
    loaded = {label: run_curves(Path(path)) for label, path in runs.items()}
    last_x = max(max(x for x, _ in c["sites"]) for _, c, _ in loaded.values())
    for (label, (metric, curves, final)), color in zip(
        loaded.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 9, strict=False
    ):
        xs, ys = zip(*curves["sites"], strict=True)
        if len(xs) == 1:  # local / central: one round of as many epochs as the others' rounds × epochs
            ax.axhline(ys[0], color=color, linestyle="--", label=f"{label}: mean over sites")
            ax.scatter(
                [last_x] * len(final), list(final.values()), color=color, marker="x", label=f"{label}: each site"
            )
        else:
            ax.plot(xs, ys, color=color, marker="o", alpha=0.5, label=f"{label}: sites after local training")
            if curves["global"]:
                gx, gy = zip(*curves["global"], strict=True)
                ax.plot(gx, gy, color=color, marker="s", linewidth=2, label=f"{label}: global model")
        per_site = ", ".join(f"{s} {v:.3f}" for s, v in sorted(final.items()))
        glob = f"{curves['global'][-1][1]:.4f}" if curves["global"] else "-"
        lines.append(f"| {label} | {metric} | {len(xs)} | {ys[-1]:.4f} (global: {glob}) | {per_site} |")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("round")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    png, markdown = out_dir / "report.png", out_dir / "report.md"
    table = "\n".join(lines) + "\n"
    write_bytes(png, buffer.getvalue())
    write_bytes(markdown, f"# {title}\n\n![curves](report.png)\n\n{table}".encode())
    return Report(png, markdown, table)
