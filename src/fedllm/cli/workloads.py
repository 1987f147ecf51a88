"""`fedllm data ...`, `fedllm model tiny-gpt`, `fedllm report`, `fedllm infer`: the workloads' commands."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedllm.cli.common import DEFAULT_WORKSPACE, ConfigOpt, WorkspaceOpt, console, done, load_config
from fedllm.config.problems import display_path
from fedllm.output import styled

if TYPE_CHECKING:
    from fedllm.data.io import Prepared

data_app = typer.Typer(
    help="Prepare datasets: Financial PhraseBank, SFT sets, site splits, the demo job's data.", no_args_is_help=True
)
model_app = typer.Typer(help="Base models built locally (no hub downloads).", no_args_is_help=True)

# The seeds' five example sentences (NeMo p-tuning inference).
EXAMPLE_SENTENCES = [
    "The products have a low salt and fat content .",
    "The agreement is valid for four years .",
    "Diluted EPS rose to EUR3 .68 from EUR0 .50 .",
    "The company is well positioned in Brazil and Uruguay .",
    "Profit before taxes decreased by 9 % to EUR 187.8 mn in the first nine months of 2008 , compared to EUR "
    "207.1 mn a year earlier .",
]


def _written(counts: dict[Path, int]) -> None:
    for path, n in counts.items():
        done("wrote", f" {display_path(path)} ({n} records)")


def _read(prepared: Prepared) -> None:
    """What each input held and every item skipped, with its reason: a data command drops nothing unsaid."""
    for source in prepared.sources:
        context = f", {source.context} of them {source.context_note}" if source.context else ""
        done("read", f" {display_path(source.path)}: {source.read} {source.unit}{context}")
        if source.skipped:
            where = f" {source.dropped} of the {source.read} {source.unit} of {display_path(source.path)}: "
            console.print(styled("skipped", "yellow", where + source.reasons()))


def _wrote(prepared: Prepared) -> None:
    _written(prepared.written)
    for path in prepared.stale:
        console.print(
            styled(
                "note:",
                "yellow",
                f" {display_path(path)} is left from an earlier split into more sites, not one of these; "
                "remove it before using the folder's files",
            )
        )


@data_app.command("fpb")
def data_fpb(
    raw: Annotated[Path, typer.Option(help="The extracted FinancialPhraseBank-v1.0 folder.")],
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("data/fpb"),
    agreement: Annotated[str, typer.Option(help="Annotator agreement: 50, 66, 75 or all.")] = "50",
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Financial PhraseBank → financial_phrase_bank_{train,val,test}.jsonl (80/10/10, seeded)."""
    from fedllm.data.fpb import prepare_fpb

    prepared = prepare_fpb(raw, out, agreement=agreement, seed=seed)
    _read(prepared)
    _wrote(prepared)


# A label table wider than this is not printed (the labels are then free text, not classes).
MAX_TABLE_LABELS = 12


@data_app.command("split")
def data_split(
    input: Annotated[Path, typer.Option("--input", help="Training jsonl to split.")],
    num_sites: Annotated[int, typer.Option(min=1, help="Number of sites.")],
    out: Annotated[Path, typer.Option(help="Output folder for site-1.jsonl … site-N.jsonl.")],
    alpha: Annotated[float | None, typer.Option(help="Dirichlet label skew (e.g. 0.5); even split if omitted.")] = None,
    min_per_site: Annotated[int, typer.Option(min=1, help="Least records per site (with --alpha).")] = 1,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Split one file over N sites (even, or label-skewed); prints each site's label counts."""
    from rich.table import Table

    from fedllm.data.split import split_file

    prepared, labels = split_file(input, num_sites, out, alpha=alpha, seed=seed, min_per_site=min_per_site)
    _read(prepared)
    names = sorted(set().union(*labels))
    shown = names if len(names) <= MAX_TABLE_LABELS else []
    table = Table(title=f"{input.name} over {num_sites} sites" + (f" (Dirichlet α={alpha})" if alpha else " (even)"))
    for column in ["site", *shown, "total"]:
        table.add_column(column, justify="right")
    for path, counter in zip(prepared.written, labels, strict=True):
        table.add_row(path.stem, *(str(counter.get(n, 0)) for n in shown), str(prepared.written[path]))
    console.print(table)
    if len(names) > len(shown):
        console.print(f"({len(names)} distinct labels: too many to tabulate)")
    _wrote(prepared)


@data_app.command("sft")
def data_sft(
    format: Annotated[str, typer.Option("--format", help="alpaca (parquet), dolly (jsonl) or oasst1 (parquet).")],
    input: Annotated[Path, typer.Option("--input", help="The dataset file.")],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    name: Annotated[str | None, typer.Option(help="File prefix (default: none, as the seeds' scripts).")] = None,
    validation: Annotated[
        Path | None,
        typer.Option(help="A second file of the format (OASST1's validation parquet), appended before the split."),
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Instruction data → {training,validation,testing}.jsonl with {"input", "output"}; prints what it skipped."""
    from fedllm.data.sft import prepare_sft

    prepared = prepare_sft(format, input, out, name=name, seed=seed, extra_input=validation)
    _read(prepared)
    _wrote(prepared)


@data_app.command("combine")
def data_combine(
    inputs: Annotated[list[Path], typer.Argument(help="jsonl files (e.g. every site's training file).")],
    out: Annotated[Path, typer.Option(help="The combined file (centralized baseline).")],
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Concatenate and shuffle several jsonl files of one format: the centralized run's training set."""
    from fedllm.data.sft import combine

    prepared = combine(inputs, out, seed=seed)
    _read(prepared)
    _wrote(prepared)


@data_app.command("synthetic")
def data_synthetic(
    out: Annotated[Path, typer.Option(help="Output folder.")],
    train: Annotated[int, typer.Option(min=3, help="Training sentences.")] = 900,
    val: Annotated[int, typer.Option(min=1, help="Validation sentences.")] = 150,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """A synthetic financial-sentiment corpus in the Financial PhraseBank jsonl format."""
    from fedllm.data.io import require_output_folder, write_jsonl_files
    from fedllm.data.synthetic import sentiment_records

    require_output_folder(out)
    _written(
        write_jsonl_files(
            {
                out / "synthetic_train.jsonl": sentiment_records(train, seed=seed),
                out / "synthetic_val.jsonl": sentiment_records(val, seed=seed + 1),
            }
        )
    )


@data_app.command("demo")
def data_demo(
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    per_site: Annotated[int, typer.Option(min=1, help="Training examples per site.")] = 300,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """The demo-mlp job's data (train.npz, val.npz) into every site's data dir, as the site config names it.

    The sites are those of -c, else of the config last provisioned into the workspace.
    """
    from fedllm.training.toy.demo_mlp import write_demo_data

    cfg, _ = load_config(config, workspace)
    # Relative data dirs resolve against this folder, as `fedllm provision` resolves them.
    site_dirs = [site.data_path(Path.cwd()) for site in cfg.sites]
    for path in write_demo_data(site_dirs, seed=seed, per_site=per_site):
        done("wrote", f" {display_path(path)}")


@model_app.command("tiny-gpt")
def model_tiny_gpt() -> None:
    """Build (once, cached under $FEDLLM_CACHE) a tiny GPT-2 pretrained on the synthetic corpus; print its path."""
    from fedllm.training.hf.tiny_gpt import build_tiny_gpt

    path = build_tiny_gpt(log=lambda m: console.print(m))
    console.print(str(path))


def report(
    runs: Annotated[list[str], typer.Argument(help="Downloaded job results, optionally LABEL=DIR.")],
    out: Annotated[Path, typer.Option(help="Folder for report.png and report.md.")] = Path("runs/report"),
    title: Annotated[str, typer.Option(help="Plot title.")] = "validation",
) -> None:
    """Validation curves of local, centralized and FedAvg runs in one PNG plus a markdown table."""
    from fedllm.cli.common import err_console
    from fedllm.output import styled
    from fedllm.results.report import write_report

    labelled: dict[str, Path] = {}
    for item in runs:
        label, sep, path = item.partition("=")
        folder = Path(path if sep else item).absolute()
        label = label if sep else folder.name
        if not label or label in labelled:
            why = "an empty label" if not label else f"the label {label!r} twice"
            raise typer.BadParameter(f"{why} ({item}); name each run: LABEL=DIR", param_hint="RUNS")
        labelled[label] = folder
    result = write_report(labelled, out.absolute(), title=title)
    console.print(result.table)
    for warning in result.warnings:
        err_console.print(styled("warning:", "yellow", f" {warning}"))
    done("wrote", f" {display_path(result.png)} and {display_path(result.markdown)}")


def infer(
    model: Annotated[str, typer.Option(help="The base model the job tuned: a Hugging Face folder or a .nemo file.")],
    prompt_encoder: Annotated[
        Path | None, typer.Option(help="A p-tuning job's result folder (or its FL_global_model.pt).")
    ] = None,
    sft: Annotated[Path | None, typer.Option(help="An SFT job's result: generate with its global model.")] = None,
    adapter: Annotated[Path | None, typer.Option(help="A LoRA job's result: its global adapter on --model.")] = None,
    sentence: Annotated[list[str] | None, typer.Option(help="Sentences (default: the seeds' five examples).")] = None,
    prompt: Annotated[
        list[str] | None, typer.Option(help="SFT/LoRA: prompts to continue (default: the sentences).")
    ] = None,
    best: Annotated[bool, typer.Option(help="Use the best global model instead of the final one.")] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 32,
    lora_alpha: Annotated[
        int | None, typer.Option(help="LoRA alpha when the result does not hold the job config.")
    ] = None,
    num_virtual_tokens: Annotated[int, typer.Option()] = 10,
    encoder_hidden: Annotated[
        int | None, typer.Option(help="The prompt encoder's MLP width, as the job had it (NeMo default 2048).")
    ] = None,
) -> None:
    """Run a tuned model: p-tuning prints "sentence sentiment: label", SFT/LoRA the generated answer.

    A .nemo base model runs through NeMo (the seeds' notebook inference), a Hugging Face folder through
    transformers.
    """
    from fedllm.results.infer import (
        INFER_FLAGS,
        generate,
        generate_answers,
        is_nemo,
        load_tuned_causal_lm,
        predict_sentiment,
    )

    given = [
        flag for flag, value in (("--prompt-encoder", prompt_encoder), ("--sft", sft), ("--adapter", adapter)) if value
    ]
    if len(given) > 1:
        raise typer.BadParameter(f"give one of {', '.join(given)}", param_hint="/".join(given))
    model = str(Path(model).expanduser().absolute())
    prompt_encoder, sft, adapter = (None if p is None else p.absolute() for p in (prompt_encoder, sft, adapter))
    if sft is not None or adapter is not None:
        prompts = prompt or [f"{s} sentiment:" for s in (sentence or EXAMPLE_SENTENCES)]
        if is_nemo(model):
            if adapter is not None:
                raise typer.BadParameter("NeMo jobs exchange full weights: use --sft", param_hint="--adapter")
            for text, answer in generate_answers(model, sft, prompts, max_tokens=max_new_tokens, best=best):
                console.print(f"{text} {answer}")
            return
        kind, result = ("sft", sft) if sft is not None else ("lora", adapter)
        tuned, tokenizer = load_tuned_causal_lm(
            model, result, kind, best=best, lora_alpha=lora_alpha, flags=INFER_FLAGS
        )
        for text, answer in zip(prompts, generate(tuned, tokenizer, prompts, max_new_tokens), strict=True):
            console.print(f"{text} {answer}")
        return
    sentences = sentence or EXAMPLE_SENTENCES
    labels = predict_sentiment(model, prompt_encoder, sentences, num_virtual_tokens, encoder_hidden, best=best)
    for text, label in labels:
        console.print(f"{text} sentiment: {label}")


def export_hf(
    result: Annotated[Path, typer.Argument(help="A downloaded SFT or LoRA job result (or its FL_global_model.pt).")],
    model: Annotated[str, typer.Option(help="The base model folder the job tuned.")],
    out: Annotated[Path, typer.Option(help="Folder for config.json + model.safetensors + tokenizer.")],
    lora: Annotated[bool, typer.Option(help="The result is a LoRA adapter: merge it into --model.")] = False,
    best: Annotated[bool, typer.Option(help="Export the best global model instead of the final one.")] = False,
    lora_alpha: Annotated[
        int | None, typer.Option(help="LoRA alpha when the result does not hold the job config.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing folder.")] = False,
) -> None:
    """A Hugging Face job's global model as a plain transformers folder (AutoModelForCausalLM.from_pretrained)."""
    from fedllm.results.infer import export_hf as run_export

    model = str(Path(model).expanduser().absolute())
    folder = run_export(
        model,
        result.absolute(),
        "lora" if lora else "sft",
        out.absolute(),
        best=best,
        lora_alpha=lora_alpha,
        overwrite=overwrite,
    )
    done("wrote", f" {display_path(folder)} (load it with AutoModelForCausalLM.from_pretrained)")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
    app.add_typer(model_app, name="model")
    app.command("report")(report)
    app.command("infer")(infer)
    app.command("export-hf")(export_hf)
