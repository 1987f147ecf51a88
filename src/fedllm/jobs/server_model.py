"""The server's initial model of a job: its class checked, its arguments following the job's trainer arguments.

The server builds `initial_model.class_path(**args)` by name when the job starts and averages the sites'
states into it, so its shapes must be the sites': a class that is not there, or an encoder of another
width than the sites', fails the job after submission. Here the class is looked up at creation, "{key}"
placeholders take the job's trainer arguments (as the trainer parses them), and a `token_dim` takes the
hidden size of the job's model where that model is readable (fedllm.jobs.template.InitialModel).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
from pathlib import Path
from typing import Any

from fedllm.checkpoint.model_spec import read_model_spec
from fedllm.jobs.errors import JobSpecError
from fedllm.jobs.template import JobTemplate

PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model")  # what Hugging Face configs call the hidden size


def model_hidden_size(model: str) -> int | None:
    """The hidden size of `model` where it is readable here: a Hugging Face folder's config.json or a .nemo.

    None where it is not (a hub id, a path that exists on the sites only, a {data_dir} path).
    """
    path = Path(model)
    if "{" in model:
        return None
    if path.suffix == ".nemo":
        return read_model_spec(path).hidden_size if path.is_file() else None
    config = path / "config.json"
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise JobSpecError(f"--model {model}: cannot read {config} ({exc}). Fix: the model folder") from None
    for key in HIDDEN_SIZE_KEYS:
        value = data.get(key) if isinstance(data, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise JobSpecError(
        f"--model {model}: {config} names no hidden size ({', '.join(HIDDEN_SIZE_KEYS)}), which the server's "
        "prompt encoder needs. Fix: point --model at the model's folder"
    )


def initial_args(
    template: JobTemplate, args: dict[str, Any], parsed: argparse.Namespace | None, notes: list[str]
) -> dict[str, Any]:
    """The server model's arguments, following the job's trainer arguments and model (see InitialModel)."""
    if template.initial_model is None:
        return {}
    values = {**args, **(vars(parsed) if parsed is not None else {})}  # typed as the trainer parses them
    initial = dict(template.initial_model.args)
    if "model" in initial and "model" in args:  # LoRA/SFT build the server's model from the sites' model
        initial["model"] = args["model"]
    resolved = {key: _fill(value, values, template, key) for key, value in initial.items()}
    if "token_dim" in resolved and args.get("model") is not None:
        model = str(args["model"])
        hidden = model_hidden_size(model)
        if hidden is not None:
            resolved["token_dim"] = hidden
        elif model != str(template.train_args.get("model")):
            notes.append(
                f"token_dim {resolved['token_dim']} (the template's) kept for the server's prompt encoder: model "
                f"{model} is not readable here (no {model}/config.json or .nemo), so its hidden size was not read. "
                "If it differs, every site stops when it loads the global encoder; create the job where the model "
                "is, or copy the template and set initial_model.args.token_dim"
            )
    return resolved


def _fill(value: Any, values: dict[str, Any], template: JobTemplate, key: str) -> Any:
    """An initial-model argument with its {trainer argument} placeholders filled in."""
    if not isinstance(value, str):
        return value

    def lookup(name: str) -> Any:
        if name not in values:
            raise JobSpecError(
                f"template {template.name}: initial_model.args.{key} refers to {{{name}}}, which is none of the "
                f"job's trainer arguments. Fix: one of {', '.join(sorted(values))}, or a literal value"
            )
        return values[name]

    whole = PLACEHOLDER_RE.fullmatch(value)
    if whole:
        return lookup(whole.group(1))
    return PLACEHOLDER_RE.sub(lambda m: str(lookup(m.group(1))), value)


def check_server_model(template: JobTemplate, notes: list[str]) -> None:
    """The server builds initial_model.class_path by name: a class that is not there fails the job at its start."""
    if template.initial_model is None:
        return
    module_name, _, class_name = template.initial_model.class_path.rpartition(".")
    where = f"template {template.name}: initial_model.class_path {template.initial_model.class_path}"
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        if module_name == "fedllm" or module_name.startswith("fedllm."):
            raise JobSpecError(
                f"{where}: no such fedllm module, so the server could not build the job's model. "
                "Fix: a class of fedllm.flare.server_models (see its docstring)"
            ) from None
        notes.append(f"{where}: module {module_name} is not installed here, so the class was not checked")
        return
    except Exception as exc:  # the module's own code failed: it would on the server too
        raise JobSpecError(f"{where}: importing {module_name} fails ({type(exc).__name__}: {exc})") from None
    if not isinstance(getattr(module, class_name, None), type):
        raise JobSpecError(
            f"{where}: {module_name} has no class {class_name}, so the server could not build the job's model. "
            "Fix: a class of fedllm.flare.server_models (see its docstring)"
        )
