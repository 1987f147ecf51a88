"""`fedllm ckpt`: inspect, verify, reshard, download and export Megatron-GPT .nemo checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedllm.cli.common import absolute, console, done
from fedllm.output import styled

app = typer.Typer(
    help="Megatron-GPT .nemo checkpoints: info, verify, convert (TP reshard), download, export-hf.",
    no_args_is_help=True,
)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _magnitude(count: int) -> str:
    """136,960 → 137 K; 20,000,000,000 → 20.0 B: the size people quote a model by."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.1f} {unit}" if count < 100 * scale else f"{count / scale:.0f} {unit}"
    return str(count)


@app.command()
def info(path: Annotated[Path, typer.Argument(help="A .nemo file.", callback=absolute)]) -> None:
    """Config summary, TP/PP, dtype, parameter count and size on disk (reads metadata only)."""
    from fedllm.checkpoint.verify import summarize

    s = summarize(path)
    spec = s.spec
    console.print(styled(str(s.path), "bold"))
    console.print(f"  layout       {s.layout} Megatron-GPT{' (megatron_legacy QKV)' if spec.megatron_legacy else ''}")
    console.print(f"  parallel     TP={s.tp} PP={s.pp}")
    console.print(
        f"  shape        {spec.num_layers} layers, hidden {spec.hidden_size}, ffn {spec.ffn_hidden_size}, "
        f"{spec.num_attention_heads} heads ({spec.num_query_groups} query groups), activation {spec.activation}, "
        f"positions {spec.position_embedding_type}"
    )
    console.print(f"  vocabulary   {s.padded_vocab} rows (padded to ×{spec.make_vocab_size_divisible_by}·TP)")
    console.print(f"  dtype        {s.dtype}")
    console.print(f"  parameters   {s.parameters:,} ({_magnitude(s.parameters)}) in {s.tensors} tensors")
    console.print(f"  on disk      {_gib(s.size_on_disk)}{' (gzip)' if s.compressed else ''}")
    console.print(f"  artifacts    {', '.join(s.artifacts) or '-'}")


@app.command()
def verify(
    path: Annotated[Path, typer.Argument(help="The .nemo file to check.", callback=absolute)],
    against: Annotated[
        Path | None,
        typer.Option(
            help="Another .nemo of the same model: merged full weights must match bit for bit.", callback=absolute
        ),
    ] = None,
) -> None:
    """Every tensor present on every rank, shapes as the config implies, every byte intact (CRC-32s)."""
    from fedllm.checkpoint.verify import compare_merged, summarize

    s = summarize(path, check_records=True)
    done("ok", f" {s.path}: {s.tensors} tensors × TP{s.tp}, shapes match model_config.yaml, CRCs intact")
    if against is not None:
        n = compare_merged(path, against)
        done("ok", f" merged weights equal to {against}'s bit for bit ({n} tensors)")


@app.command()
def convert(
    source: Annotated[
        Path, typer.Option("--source", help="The .nemo to reshard (its TP is read from its config).", callback=absolute)
    ],
    target: Annotated[Path, typer.Option("--target", help="Where to write the resharded .nemo.", callback=absolute)],
    target_tp: Annotated[int, typer.Option("--target-tp", min=1, help="Tensor-parallel size of the output.")],
    vocab_size: Annotated[
        int | None,
        typer.Option(min=1, help="Unpadded vocabulary (default: the tokenizer's vocab.json in the archive)."),
    ] = None,
    check_equal: Annotated[
        bool, typer.Option(help="Before the rename, also compare the merged weights with the source bit for bit.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing target.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar per layer.")] = True,
) -> None:
    """Reshard a Megatron-GPT .nemo to another tensor-parallel size, streaming (no NeMo, little RAM)."""
    from fedllm.checkpoint.errors import CheckpointError
    from fedllm.checkpoint.reshard import convert as run_convert
    from fedllm.checkpoint.verify import compare_merged, summarize

    def check(tmp: Path) -> None:
        s = summarize(tmp)
        if s.tp != target_tp:
            raise CheckpointError(f"{tmp}: written with TP={s.tp}, expected {target_tp}")
        if check_equal:
            compare_merged(tmp, source)

    result = run_convert(
        source, target, target_tp, vocab_size=vocab_size, overwrite=overwrite, progress=progress, verify=check
    )
    done(
        "converted",
        f" {source} (TP{result.source_tp}) → {result.target} (TP{result.target_tp}): "
        f"{result.tensors} tensors, vocabulary {result.vocab_size} padded {result.source_padded_vocab} → "
        f"{result.target_padded_vocab}, verified",
    )


@app.command()
def download(
    repo: Annotated[str, typer.Option(help="Hugging Face model repository.")] = "nvidia/nemo-megatron-gpt-20B",
    file: Annotated[str, typer.Option(help="File in the repository.")] = "nemo_gpt20B_bf16_tp4.nemo",
    revision: Annotated[str, typer.Option(help="Branch, tag or commit.")] = "main",
    models_dir: Annotated[
        Path, typer.Option(envvar="FEDLLM_MODELS_DIR", callback=absolute, help="Where checkpoints are kept.")
    ] = Path("models"),
    endpoint: Annotated[str | None, typer.Option(envvar="HF_ENDPOINT", help="Hub URL (a mirror).")] = None,
    sha256: Annotated[str | None, typer.Option(help="Expected sha256 (default: the hub's LFS metadata).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Fetch a checkpoint from the hub: resumable (.part + HTTP Range), free space checked, sha256 verified."""
    from fedllm.checkpoint.download import download as run_download
    from fedllm.checkpoint.download import resolve_url

    dest = run_download(
        resolve_url(repo, file, revision, endpoint), models_dir / file, sha256=sha256, progress=progress
    )
    done("downloaded", f" {dest} ({_gib(dest.stat().st_size)}), sha256 verified")


@app.command("export-hf")
def export_hf(
    source: Annotated[Path, typer.Argument(help="The .nemo to export.", callback=absolute)],
    out: Annotated[
        Path, typer.Option("--out", help="Folder for config.json + safetensors (new, or empty).", callback=absolute)
    ],
    vocab_size: Annotated[
        int | None, typer.Option(min=1, help="Unpadded vocabulary (default: the tokenizer's).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing folder.")] = False,
) -> None:
    """Write a Hugging Face folder (GPT-2 or, for rotary models, GPT-NeoX; config + safetensors)."""
    from fedllm.checkpoint.hf_export import export_hf as run_export

    folder = run_export(source, out, vocab_size=vocab_size, overwrite=overwrite)
    done("exported", f" {source} → {folder} ({_arch(folder)}; load with transformers.AutoModelForCausalLM)")


def _arch(folder: Path) -> str:
    import json

    return {"gpt2": "GPT-2", "gpt_neox": "GPT-NeoX"}[json.loads((folder / "config.json").read_text())["model_type"]]
