"""`make demo`: a tiny federation on this machine that really trains, end to end.

Provision three sites from the embedded config (site_configs/local.yaml), write each
site's private data, start server and sites as local processes (mTLS), submit a FedAvg
job, wait, download, print per-round metrics and the final global model's accuracy on
the shared validation set, and stop everything, also on failure.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.table import Table

from fedllm.cli.common import console, echo
from fedllm.config import load_site_config
from fedllm.config.problems import display_path
from fedllm.jobs.create import create_job, resolve_spec
from fedllm.jobs.submit import read_round_metrics, submit_job
from fedllm.jobs.template import load_template
from fedllm.provision import provision
from fedllm.resources import resource_dir
from fedllm.runtime import native
from fedllm.training import demo_mlp

DEMO_CONFIG = "local.yaml"


def global_model_path(result_dir: Path) -> Path:
    return result_dir / "workspace" / "app_server" / "FL_global_model.pt"


def load_global_state(result_dir: Path) -> dict[str, torch.Tensor]:
    """The server's final global weights (PTFileModelPersistor's checkpoint)."""
    ckpt = torch.load(global_model_path(result_dir), map_location="cpu", weights_only=True)
    return ckpt.get("model", ckpt)


def run_demo(workspace: Path, rounds: int = 5, config_path: Path | None = None) -> dict:
    t0 = time.monotonic()
    config_path = config_path or resource_dir("site_configs") / DEMO_CONFIG
    cfg = load_site_config(config_path)
    workspace = workspace.resolve()
    data_root = workspace / "data"

    site_dirs = [data_root / s.name for s in cfg.sites]
    demo_mlp.write_demo_data(site_dirs, data_root / "val.npz")
    echo(f"[bold]1/5[/] wrote private training data for {len(site_dirs)} sites under {display_path(data_root)}")

    # Site data dirs are data/<site> relative to the data root, as the config's defaults say.
    kits = provision(cfg, workspace / "kits", source=display_path(config_path), data_root=workspace)
    echo(f"[bold]2/5[/] provisioned mTLS startup kits → {display_path(kits.prod_dir)}")

    spec = resolve_spec(load_template("demo-mlp"), "fedavg", num_clients=len(cfg.sites), rounds=rounds)
    job_dir = create_job(spec, workspace / "jobs")
    echo(f"[bold]3/5[/] created job {display_path(job_dir)} ({rounds} FedAvg rounds × 1 epoch)")

    echo("[bold]4/5[/] starting the federation (server + sites as local processes)")
    native.up(kits, echo=lambda m: echo("      " + m))
    try:
        result = submit_job(
            kits, job_dir, download=workspace / "results", timeout=900, echo=lambda m: echo("      " + m)
        )
    finally:
        native.down(kits, echo=lambda m: echo("      " + m))

    rounds_seen = read_round_metrics(result.result_dir)
    vx, vy = demo_mlp.load_split(data_root / "val.npz")
    final = demo_mlp.evaluate(demo_mlp.TinyClassifier.from_state_dict(load_global_state(result.result_dir)), vx, vy)
    _print_rounds(rounds_seen, cfg.site_names)
    echo(
        f"[bold]5/5[/] [green]{result.status}[/] in {time.monotonic() - t0:.0f}s — final global model: "
        f"val accuracy {final.accuracy:.3f}, val loss {final.loss:.3f} (chance: {1 / demo_mlp.CLASSES:.3f})"
    )
    echo(f"      result: {display_path(result.result_dir)}")
    echo(f"      global model: {display_path(global_model_path(result.result_dir))}")
    return {"result": result, "rounds": rounds_seen, "final_accuracy": final.accuracy}


def _print_rounds(rounds: list[dict], sites: list[str]) -> None:
    table = Table(title="validation accuracy per round: global model received, then each site after training")
    table.add_column("round", justify="right")
    table.add_column("global", justify="right")
    for site in sites:
        table.add_column(site, justify="right")
    table.add_column("site mean", justify="right")
    for rnd in rounds:
        agg = rnd["aggregated"]
        row = [str(rnd["round"]), f"{agg.get('global_val_accuracy', float('nan')):.3f}"]
        row += [f"{rnd['sites'].get(s, {}).get('val_accuracy', float('nan')):.3f}" for s in sites]
        row.append(f"{agg.get('val_accuracy', float('nan')):.3f}")
        table.add_row(*row)
    console.print(table)
