"""The FL overhead of Hugging Face SFT: tokens/s of SFT rounds inside a real federation vs the same Trainer alone.

One run measures both, on the same data, model, seed and Trainer settings:

- baseline: `fedllm.training.hf.sft --without-nvflare` under torchrun (the same SFTTrainer, R × E epochs
  in one train() call, no NVFlare);
- federated: a 1-site FedAvg hf-sft job of R rounds × E epochs on a native loopback federation with
  mTLS (NVFlare's HF integration: receive, evaluate the received model, train, end-of-round
  evaluation, checkpoint, send the full weights, final evaluation).

It prints tokens/s of training alone (Trainer's train_runtime; the federated run's per-round runtimes
summed) and end to end (process start to model on disk, or job submit to FINISHED), and their ratios;
the two kinds of run alternate (--repeat, default 2) and the fastest of each is reported.
Default model: fedllm's tiny GPT on CPU; on a GPU pass --model /models/<a real causal LM> --devices N.

    .venv/bin/python benchmarks/hf_sft.py                         # tiny GPT, CPU, 1 rank
    .venv/bin/python benchmarks/hf_sft.py --model /models/Llama-3.2-1B --devices 1 --examples 2000 --max-length 512

Last line: `hf-sft FL overhead: federated X vs alone Y tok/s in training (Z× of alone), end to end ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedllm.apps.local_federation import local_federation, loopback_config_dict
from fedllm.config.site_config import SiteConfig
from fedllm.data.io import write_jsonl_files
from fedllm.data.synthetic import sentiment_records
from fedllm.jobs.create import cli_args, create_job, resolve_spec
from fedllm.jobs.template import load_template
from fedllm.results.metrics import read_site_scalars


def pairs(n: int, seed: int) -> list[dict[str, str]]:
    return [{"input": f"{r['sentence']} sentiment:", "output": r["label"]} for r in sentiment_records(n, seed=seed)]


def run_alone(train_args: dict, devices: int, out: Path) -> tuple[dict, float]:
    entry = out.parent / "entry.py"
    entry.write_text("from fedllm.training.hf.sft import main\nmain()\n")
    torchrun = Path(sys.executable).with_name("torchrun")
    started = time.monotonic()
    subprocess.run(
        [str(torchrun), "--standalone", f"--nproc_per_node={devices}", str(entry), *cli_args(train_args).split(),
         "--without-nvflare", str(out)],
        check=True, capture_output=True,  # the environment the sites' torchrun gets: the same thread settings
    )  # fmt: skip
    return json.loads((out / "trainer_metrics.json").read_text()), time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="causal LM folder (default: fedllm's tiny GPT, built on CPU)")
    parser.add_argument("--examples", type=int, default=480)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--devices", type=int, default=1, help="ranks (GPUs, or CPU processes with gloo)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every training process (both runs)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each, interleaved; the fastest is reported")
    parser.add_argument("--arg", "-a", action="append", default=[], help="more trainer arguments KEY=VALUE")
    args = parser.parse_args()
    # The sites' processes and the baseline inherit this: the same threads on both sides of the ratio
    # (multi-threaded kernels on an oversubscribed machine are several times slower, whichever run it hits).
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if not args.model:
        from fedllm.training.hf.tiny_gpt import build_tiny_gpt

        args.model = str(build_tiny_gpt())
    root = Path(tempfile.mkdtemp(prefix="fedllm-bench-hf-"))
    print(f"workspace (jobs, results, the baseline's model): {root}")
    train, val = root / "data" / "training.jsonl", root / "data" / "validation.jsonl"
    write_jsonl_files({train: pairs(args.examples, 1), val: pairs(64, 2)})
    extra = {"batch_size": args.batch_size, "max_length": args.max_length, "logging_steps": 1,
             "gradient_checkpointing": False, **dict(a.split("=", 1) for a in args.arg)}  # fmt: skip
    template = load_template("hf-sft")
    spec = resolve_spec(
        template, "fedavg", num_clients=1, rounds=args.rounds, local_epochs=args.epochs, devices=args.devices,
        model=args.model, validation=str(val), extra_args=extra, data=[str(train)],
    )  # fmt: skip

    cfg = SiteConfig.model_validate(loopback_config_dict("hfbench", sites=1))
    fed_spec = dataclasses.replace(spec, site_args={"site-1": {"train": str(train)}})
    alone_runs, fed_runs = [], []
    with local_federation(cfg, root / "ws", data_root=root, source="benchmark", echo=lambda _m: None) as fed:
        # Interleaved, the fastest of each kept: the machine may be shared, and a slow moment hits one run only.
        for i in range(args.repeat):
            alone_runs.append(
                run_alone({**spec.train_args, "epochs": args.rounds * args.epochs}, args.devices, root / f"alone{i}")
            )
            job = create_job(dataclasses.replace(fed_spec, name=f"hf-sft-bench-{i}"), root / "jobs")
            started = time.monotonic()
            result = fed.submit(job, download=root / "results", timeout=3600, echo=lambda _m: None)
            wall = time.monotonic() - started
            streamed = read_site_scalars(result.result_dir)["site-1"]
            fed_runs.append(
                (sum(v for _, v in streamed["train_runtime"]), max(v for _, v in streamed["num_tokens"]), wall)
            )
    alone = min((m for m, _ in alone_runs), key=lambda m: m["train_runtime"])
    alone_wall = min(w for _, w in alone_runs)
    tokens = float(alone["num_tokens"])
    fed_train_s = min(r[0] for r in fed_runs)
    fed_tokens = fed_runs[0][1]
    fed_wall = min(r[2] for r in fed_runs)

    rows = [
        ("alone (same Trainer, no NVFlare)", tokens, alone["train_runtime"], alone_wall),
        (f"federated (1 site, {args.rounds} rounds)", fed_tokens, fed_train_s, fed_wall),
    ]
    print(f"hf-sft on {Path(args.model).name}: {args.examples} examples × {args.rounds * args.epochs} epochs, "
          f"{args.devices} rank(s), batch {args.batch_size}, max_length {args.max_length}; fastest of {args.repeat}")  # fmt: skip
    print("  train s, all runs: alone " + ", ".join(f"{m['train_runtime']:.1f}" for m, _ in alone_runs)
          + "; federated " + ", ".join(f"{r[0]:.1f}" for r in fed_runs))  # fmt: skip
    print(f"{'run':40} {'tokens':>9} {'train s':>8} {'tok/s train':>12} {'wall s':>8} {'tok/s wall':>11}")
    for name, n, train_s, wall in rows:
        print(f"{name:40} {n:9.0f} {train_s:8.1f} {n / train_s:12.0f} {wall:8.1f} {n / wall:11.0f}")
    train_share = (fed_tokens / fed_train_s) / (tokens / alone["train_runtime"])
    wall_share = (fed_tokens / fed_wall) / (tokens / alone_wall)
    print(
        f"hf-sft FL overhead: federated {fed_tokens / fed_train_s:.0f} vs alone {tokens / alone['train_runtime']:.0f} "
        f"tok/s in training ({train_share:.2f}× of alone), end to end {fed_tokens / fed_wall:.0f} vs "
        f"{tokens / alone_wall:.0f} tok/s ({wall_share:.2f}× of alone)"
    )


if __name__ == "__main__":
    main()
