"""The GPU proof of the NeMo backend: one FL round of p-tuning through a real server and site(s).

On a machine with an NVIDIA GPU and NeMo (the fedllm NeMo image), no internet needed:
  1. synthetic FPB-like sentiment data for each site (fedllm.data.synthetic) + a shared validation set;
  2. a random-weight Megatron-GPT with the 345M shapes (fedllm.apps.random_checkpoint);
  3. provision server + N sites (mTLS kits), all on GPU 0, start them as local processes;
  4. `nemo-ptuning-345m` as a FedAvg job (R rounds × 1 epoch), submit, wait, download;
  5. print per round and site: steps, train/val loss, round time, GPU memory peak; stop everything.

    python -m fedllm.apps.gpu_proof --workspace runs/nemo-gpu-proof --sites 1 --rounds 1
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from fedllm.apps.local_federation import local_federation
from fedllm.config.site_config import SiteConfig
from fedllm.data.io import write_jsonl_files
from fedllm.data.synthetic import sentiment_records
from fedllm.jobs.create import create_job, resolve_spec
from fedllm.jobs.template import load_template
from fedllm.results.metrics import read_round_metrics
from fedllm.training.nemo.compat import require_nemo_nlp
from fedllm.training.nemo.errors import NemoUnavailableError


def write_data(data_root: Path, sites: list[str], per_site: int, val: int) -> None:
    """Each site's train.jsonl (its own sentences) and val.jsonl (the same for all), written all-or-nothing."""
    val_records = sentiment_records(val, seed=999)
    files: dict[Path, list] = {}
    for i, site in enumerate(sites):
        files[data_root / site / "train.jsonl"] = sentiment_records(per_site, seed=i)
        files[data_root / site / "val.jsonl"] = val_records
    write_jsonl_files(files)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workspace", type=Path, default=Path("runs/nemo-gpu-proof"))
    p.add_argument("--sites", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--per-site", type=int, default=400, help="training records per site")
    p.add_argument("--checkpoint", type=Path, default=None, help="an existing .nemo (default: make a random 345M)")
    args = p.parse_args(argv)

    import torch

    version = require_nemo_nlp()
    if not torch.cuda.is_available():
        raise NemoUnavailableError("no CUDA GPU visible. Fix: run the GPU proof on a machine with an NVIDIA GPU")
    ws = args.workspace.resolve()
    t0 = time.monotonic()
    names = [f"site-{i + 1}" for i in range(args.sites)]
    write_data(ws / "data", names, args.per_site, val=200)
    print(f"1/5 NeMo {version}, {torch.cuda.get_device_name(0)}; data for {names} under {ws / 'data'}")

    ckpt = args.checkpoint or ws / "models" / "gpt345m_random.nemo"
    if not ckpt.exists():
        cmd = [
            sys.executable,
            "-m",
            "fedllm.apps.random_checkpoint",
            "--text",
            str(ws / "data" / names[0] / "train.jsonl"),
        ]
        subprocess.run([*cmd, "--out", str(ckpt)], check=True)
    print(f"2/5 base model {ckpt} ({ckpt.stat().st_size / 2**20:.0f} MiB)")

    cfg = SiteConfig.model_validate(
        {
            "project": "nemoproof",
            "server": {"name": "localhost", "fed_learn_port": 18002, "admin_port": 18003},
            "admins": [{"name": "admin@nvidia.com"}],
            # The seeds' 345M run: three sites share one 16 GB GPU.
            "sites": [{"name": n, "gpus": [0]} for n in names],
            "allow_gpu_sharing": len(names) > 1,
        }
    )
    spec = resolve_spec(
        load_template("nemo-ptuning-345m"), "fedavg", rounds=args.rounds, num_clients=args.sites, model=str(ckpt)
    )
    job = create_job(spec, ws / "jobs", overwrite=True)  # the proof's own folder: a rerun replaces its job
    say = lambda m: print("      " + m)  # noqa: E731
    with local_federation(cfg, ws / "kits", data_root=ws, source="gpu_proof", echo=say) as fed:
        print(f"3/5 provisioned {fed.kits.prod_dir} and started it; job {job}")
        result = fed.submit(job, download=ws / "results", timeout=3600, echo=say)
    print(f"4/5 {result.status} in {result.duration_s:.0f}s; result {result.result_dir}")
    keys = (
        "train_steps",
        "train_loss",
        "global_val_loss",
        "val_loss",
        "round_seconds",
        "gpu_max_memory_gib",
        "bytes_sent",
    )
    for rnd in read_round_metrics(result.result_dir):
        for site, m in sorted(rnd["sites"].items()):
            print(f"      round {rnd['round']} {site}: " + "  ".join(f"{k}={m[k]:.4g}" for k in keys if k in m))
    print(f"5/5 done in {time.monotonic() - t0:.0f}s")


if __name__ == "__main__":
    main()
