"""TP4 → TP2 resharding benchmark: fedllm's streaming resharder vs the I/O floor vs NeMo's algorithm.

    make bench-convert    # = .venv/bin/python benchmarks/convert.py --layers 4 --layers-flat 1

Builds a synthetic Megatron-GPT .nemo with the 20B model's layer shapes (hidden 6144, ffn 24576, 48 heads,
GPT-2 vocabulary padded to 50688, bf16, TP4), then measures in one run, each in a fresh subprocess:
  copy   — a plain copy of the same bytes with fsync (the I/O floor);
  fedllm — `fedllm.checkpoint.convert` (streaming, includes the structural verification the CLI runs);
  naive  — what NeMo's megatron_change_num_partitions.py does, reimplemented here because NeMo cannot be
           installed on this machine: extract the archive, torch.load every source rank fully, merge into
           a TP1 state dict in RAM, split it into the target ranks, torch.save them and tar the result.
Prints wall time and peak RSS (VmHWM of the subprocess) of each and the ratios; copy and fedllm run
--repeat times, alternating, and the fastest run of each is compared (the disk is shared and noisy). With --layers-flat
it also runs fedllm on a checkpoint with fewer layers to show that its peak RSS does not grow with depth.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch
import yaml

from fedllm.checkpoint.archive import NemoArchiveWriter, rank_member_name
from fedllm.checkpoint.torch_zip import StreamingStateDictWriter

HIDDEN, FFN, HEADS, VOCAB, SEQ = 6144, 24576, 48, 50257, 2048  # Megatron-GPT 20B (research.md)


def make_checkpoint(path: Path, layers: int, tp: int = 4) -> None:
    """Random bf16 weights in the legacy NeMo layout, written rank by rank (never the whole model in RAM)."""
    padded = -(-VOCAB // (128 * tp)) * 128 * tp
    cfg = {
        "num_layers": layers, "hidden_size": HIDDEN, "ffn_hidden_size": FFN, "num_attention_heads": HEADS,
        "max_position_embeddings": SEQ, "encoder_seq_length": SEQ, "make_vocab_size_divisible_by": 128,
        "activation": "gelu", "position_embedding_type": "learned_absolute", "precision": "bf16",
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": 1, "megatron_legacy": False,
        "tokenizer": {"library": "megatron", "type": "GPT2BPETokenizer", "vocab_file": "nemo:vocab.json"},
    }  # fmt: skip
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(torch.bfloat16)

    writer = NemoArchiveWriter(path)
    writer.add_bytes("model_config.yaml", yaml.safe_dump(cfg).encode())
    writer.add_bytes("vocab.json", json.dumps({f"t{i}": i for i in range(VOCAB)}).encode())
    pos = rnd(SEQ, HIDDEN)
    for r in range(tp):
        with writer.member_stream(rank_member_name(r, tp)) as stream:
            out = StreamingStateDictWriter(stream)
            p = "model.language_model."
            out.add_tensor(p + "embedding.word_embeddings.weight", rnd(padded // tp, HIDDEN))
            out.add_tensor(p + "embedding.position_embeddings.weight", pos)
            for i in range(layers):
                q = f"{p}encoder.layers.{i}."
                for name, shape in (
                    ("input_layernorm.weight", (HIDDEN,)), ("input_layernorm.bias", (HIDDEN,)),
                    ("self_attention.query_key_value.weight", (3 * HIDDEN // tp, HIDDEN)),
                    ("self_attention.query_key_value.bias", (3 * HIDDEN // tp,)),
                    ("self_attention.dense.weight", (HIDDEN, HIDDEN // tp)), ("self_attention.dense.bias", (HIDDEN,)),
                    ("post_attention_layernorm.weight", (HIDDEN,)), ("post_attention_layernorm.bias", (HIDDEN,)),
                    ("mlp.dense_h_to_4h.weight", (FFN // tp, HIDDEN)), ("mlp.dense_h_to_4h.bias", (FFN // tp,)),
                    ("mlp.dense_4h_to_h.weight", (HIDDEN, FFN // tp)), ("mlp.dense_4h_to_h.bias", (HIDDEN,)),
                ):  # fmt: skip
                    # replicated tensors must be equal on every rank: seed them by name
                    t = (
                        rnd(*shape)
                        if ("layernorm" not in name and not name.endswith("dense.bias") and "4h_to_h.bias" not in name)
                        else torch.ones(shape, dtype=torch.bfloat16)
                    )
                    out.add_tensor(q + name, t)
            out.add_tensor(p + "encoder.final_layernorm.weight", torch.ones(HIDDEN, dtype=torch.bfloat16))
            out.add_tensor(p + "encoder.final_layernorm.bias", torch.zeros(HIDDEN, dtype=torch.bfloat16))
            out.finish()
    writer.finish()


# -- the measured jobs (each runs in its own subprocess) ---------------------------------------------------------
def job_copy(src: Path, dst: Path) -> None:
    """Read and write every byte through user space (no copy_file_range shortcut), then fsync."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(1 << 22):
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())


def job_fedllm(src: Path, dst: Path) -> None:
    from fedllm.checkpoint.reshard import convert
    from fedllm.checkpoint.verify import summarize

    convert(src, dst, 2, progress=False, verify=summarize)


def job_naive(src: Path, dst: Path) -> None:
    """NeMo's megatron_change_num_partitions.py memory behaviour: all ranks loaded, merged, split, saved."""
    work = dst.parent / "naive-extract"
    work.mkdir()
    with tarfile.open(src) as tar:
        tar.extractall(work, filter="data")
    cfg = yaml.safe_load((work / "model_config.yaml").read_text())
    tp = cfg["tensor_model_parallel_size"]
    ranks = [torch.load(work / f"mp_rank_{r:02d}/model_weights.ckpt", map_location="cpu") for r in range(tp)]
    merged = {}
    for key, first in ranks[0].items():  # NeMo decides by shape, like this
        parts = [sd[key] for sd in ranks]
        if all(p.shape == first.shape for p in parts) and torch.equal(parts[0], parts[-1]) and "dense" not in key:
            merged[key] = first.clone()
        elif key.endswith(("self_attention.dense.weight", "dense_4h_to_h.weight")):
            merged[key] = torch.cat(parts, dim=1)
        else:
            merged[key] = torch.cat(parts, dim=0)
    target_tp = 2
    padded = -(-50257 // (128 * target_tp)) * 128 * target_tp
    targets = [{} for _ in range(target_tp)]
    for key, full in merged.items():
        if "word_embeddings" in key:
            full = full[:padded]
        if key.endswith(("self_attention.dense.weight", "dense_4h_to_h.weight")):
            chunks = full.chunk(target_tp, dim=1)
        elif full.dim() and full.shape[0] in (padded, 3 * HIDDEN, FFN) and "position" not in key:
            chunks = full.chunk(target_tp, dim=0)
        else:
            chunks = [full] * target_tp
        for r in range(target_tp):
            targets[r][key] = chunks[r].clone()
    out = dst.parent / "naive-out"
    for r, sd in enumerate(targets):
        (out / f"mp_rank_{r:02d}").mkdir(parents=True)
        torch.save(sd, out / f"mp_rank_{r:02d}/model_weights.ckpt")
    cfg["tensor_model_parallel_size"] = target_tp
    (out / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    shutil.copy(work / "vocab.json", out / "vocab.json")
    with tarfile.open(dst, "w") as tar:
        tar.add(out, arcname=".")
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())
    shutil.rmtree(work)
    shutil.rmtree(out)


def _child(kind: str, src: str, dst: str) -> None:
    import fedllm.checkpoint.reshard  # noqa: F401 - imports count in the floor below, not in the job

    start_rss = _peak_rss()
    t0 = time.perf_counter()
    {"copy": job_copy, "fedllm": job_fedllm, "naive": job_naive}[kind](Path(src), Path(dst))
    wall = time.perf_counter() - t0
    print(json.dumps({"wall_s": wall, "peak_rss_bytes": _peak_rss(), "start_rss_bytes": start_rss}))


def _peak_rss() -> int:
    """VmHWM: this process's own peak RSS (ru_maxrss would include the parent's RSS at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(kind: str, src: Path, workdir: Path) -> dict:
    dst = workdir / f"out-{kind}.nemo"
    dst.unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(src), str(dst)], capture_output=True, text=True, check=False
    )
    if proc.returncode:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    dst.unlink(missing_ok=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--layers-flat", type=int, default=0, help="also run fedllm with this many layers")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/fedllm-bench"))
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--repeat", type=int, default=2, help="runs of copy and fedllm (alternating); the fastest counts")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(*args.child)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    sizes = {}
    for layers in sorted({args.layers, *([args.layers_flat] if args.layers_flat else [])}):
        src = args.workdir / f"synthetic_20B_shapes_{layers}L_tp4.nemo"
        if not src.exists():
            t0 = time.perf_counter()
            make_checkpoint(src, layers)
            print(
                f"made {src.name}: {src.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s", flush=True
            )
        sizes[layers] = src.stat().st_size
        if layers != args.layers:
            kinds = ["fedllm"]
        else:  # copy and fedllm alternate so that both see the same cache and disk conditions
            kinds = ["copy", "fedllm"] * args.repeat + ([] if args.skip_naive else ["naive"])
        for kind in kinds:
            r = measure(kind, src, args.workdir)
            best = results.get((kind, layers))
            if best is None or r["wall_s"] < best["wall_s"]:
                results[(kind, layers)] = r
            print(
                f"{kind:7s} {layers}L  wall {r['wall_s']:7.1f} s  peak RSS {r['peak_rss_bytes'] / 2**30:6.2f} GiB "
                f"(python+torch at start {r['start_rss_bytes'] / 2**30:.2f} GiB)",
                flush=True,
            )
    L = args.layers
    copy, ours = results[("copy", L)], results[("fedllm", L)]
    layer_bytes = (3 * HIDDEN * HIDDEN + HIDDEN * HIDDEN + 2 * FFN * HIDDEN) * 2
    print(
        f"\ncheckpoint: {L} layers of the 20B shapes, {sizes[L] / 2**30:.2f} GiB, one layer {layer_bytes / 2**30:.2f} GiB"
    )
    print(f"fedllm / copy time:        {ours['wall_s'] / copy['wall_s']:.2f}x")
    print(
        f"fedllm peak RSS:           {ours['peak_rss_bytes'] / 2**30:.2f} GiB ({ours['peak_rss_bytes'] / sizes[L]:.2f}x the checkpoint)"
    )
    if ("naive", L) in results:
        naive = results[("naive", L)]
        print(f"naive (NeMo algorithm):    {naive['wall_s']:.1f} s, peak RSS {naive['peak_rss_bytes'] / 2**30:.2f} GiB")
        print(f"naive / fedllm peak RSS:   {naive['peak_rss_bytes'] / ours['peak_rss_bytes']:.1f}x")
        print(f"naive / fedllm time:       {naive['wall_s'] / ours['wall_s']:.2f}x")
    if args.layers_flat:
        small = results[("fedllm", args.layers_flat)]
        print(
            f"fedllm peak RSS {args.layers_flat}L vs {L}L: {small['peak_rss_bytes'] / 2**30:.2f} vs {ours['peak_rss_bytes'] / 2**30:.2f} GiB"
        )


if __name__ == "__main__":
    main()
