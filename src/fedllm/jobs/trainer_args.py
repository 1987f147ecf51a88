"""A job's trainer arguments, checked against the trainer's own parser before the job leaves.

Each fedllm trainer module exposes `argument_parser()`, the argparse parser its `main()` parses with;
a site runs `main()` with the job's arguments rendered as `--key value` (`cli_args`). Parsing that same
rendering here, with the same parser, finds at job creation what would otherwise stop every site after
submission: an unknown key (with "did you mean"), a value of the wrong type, a choice the trainer does
not offer, a switch given a value. The trainer module is imported by name when a job is created, never
when fedllm.jobs is imported: a trainer module loads torch at most, never NeMo or transformers, which
the trainers import when they run (so NeMo templates are checked where NeMo is not installed).

The same check runs on any set of arguments (`TrainerArguments.check`), so each site's own
arguments are checked like the job's.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import pkgutil
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedllm.jobs.errors import JobSpecError

PARSER_FUNCTION = "argument_parser"
KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Names people reach for that the trainers spell otherwise (for "did you mean").
ALIASES = {
    "learning_rate": "lr",
    "gradient_accumulation_steps": "grad_accum",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
}
TRUE_WORDS = {"true", "yes", "on", "1"}
FALSE_WORDS = {"false", "no", "off", "0"}
SCALARS = (str, int, float, bool)


class TrainerUnavailable(Exception):
    """The trainer's parser cannot be had on this machine; the message says why (its arguments go unchecked)."""


class _Rejected(Exception):
    """argparse's complaint, raised instead of printed and exited."""


def _reject(message: str):
    raise _Rejected(message)


def option_key(key: str) -> str:
    """A trainer argument's key as templates and `-a` write it (dashes become underscores)."""
    return key.replace("-", "_")


def cli_args(args: Mapping[str, Any]) -> str:
    """Render trainer arguments as NVFlare's script_args (which it splits on whitespace)."""
    parts: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                parts.append(flag)
            continue
        text = str(value)
        if not text or any(c.isspace() for c in text) or text[0] in "'\"":
            raise JobSpecError(
                f"argument {flag} {text!r} is empty, quoted or contains whitespace; NVFlare passes script "
                "arguments split on whitespace, so use paths and values without spaces"
            )
        parts += [flag, text]
    return " ".join(parts)


def parse_assignments(items: list[str], option: str = "-a") -> dict[str, str]:
    """`KEY=VALUE` items (`-a lr=0.001`) as {key: text}; the trainer's parser types the text, as on the site."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = option_key(key.strip())
        if not sep or not KEY_RE.fullmatch(key):
            raise JobSpecError(f"{option} {item!r} is not KEY=VALUE; write e.g. {option} lr=0.0001")
        if not value:
            raise JobSpecError(
                f"{option} {item!r} gives no value; write {option} {key}=VALUE, or leave it out for the template's"
            )
        out[key] = value
    return out


@dataclass(frozen=True)
class Argument:
    """One trainer argument, as `fedllm job args` lists it."""

    key: str
    kind: str  # "switch", "int", "float", "text" or "a|b|c"
    default: Any
    required: bool
    help: str


@dataclass(frozen=True)
class TrainerArguments:
    """A trainer module's parser, and the checks of a job's arguments against it."""

    module: str
    parser: argparse.ArgumentParser
    template: str = "TEMPLATE"  # named in the fixes: `fedllm job args TEMPLATE`

    @property
    def actions(self) -> dict[str, argparse.Action]:
        """key → argparse action, for every `--option` of the trainer."""
        found = {}
        for action in self.parser._actions:  # argparse has no public list of its actions
            longs = [o for o in action.option_strings if o.startswith("--")]
            if longs and not isinstance(action, argparse._HelpAction):
                found[option_key(longs[0][2:])] = action
        return found

    def takes(self, key: str) -> bool:
        return key in self.actions

    def describe(self) -> list[Argument]:
        rows = []
        for key, action in self.actions.items():
            if action.nargs == 0:
                kind = "switch"
            elif action.choices:
                kind = "|".join(str(c) for c in action.choices)
            else:
                kind = getattr(action.type, "__name__", "text") if action.type else "text"
            help_text = "" if action.help in (None, argparse.SUPPRESS) else str(action.help)
            rows.append(Argument(key, kind, action.default, bool(action.required), help_text))
        return rows

    def coerce(self, args: Mapping[str, Any], context: str) -> dict[str, Any]:
        """Switches as booleans (`-a packing=true`); a value never given to a switch, true/false never to a value."""
        actions = self.actions
        out = dict(args)
        for key, value in args.items():
            action = actions.get(key)
            if action is None:
                raise self.unknown(key, context)
            if action.nargs == 0:
                out[key] = _switch(key, value, context)
            elif isinstance(value, bool):
                raise JobSpecError(
                    f"{context}: {key}={str(value).lower()}, but the trainer's --{key.replace('_', '-')} takes a "
                    f"value ({_kind(action)}), not true/false; give one, e.g. {key}={_example(action)}"
                )
        return out

    def check(self, args: Mapping[str, Any], context: str) -> tuple[dict[str, Any], argparse.Namespace]:
        """`args` with switches as booleans, and the trainer's own parse of them as a site will parse them.

        A JobSpecError names the key, what the trainer takes and the fix.
        """
        args = self.coerce(args, context)
        argv = cli_args(args).split()
        parser = self.parser
        parser.exit_on_error = False
        parser.error = _reject  # type: ignore[method-assign]  # raise, do not print and exit
        try:
            return args, parser.parse_args(argv)
        except (argparse.ArgumentError, _Rejected) as exc:
            raise JobSpecError(
                f"{context}: trainer {self.module} rejects the job's arguments: {exc}. Fix: change the -a value "
                f"(or the template's train_args); `fedllm job args {self.template}` lists each argument with its type and choices"
            ) from None

    def unknown(self, key: str, context: str) -> JobSpecError:
        keys = list(self.actions)
        guess = ALIASES.get(key)
        if guess not in keys:
            close = difflib.get_close_matches(key, keys + list(ALIASES), n=1)
            guess = ALIASES.get(close[0], close[0]) if close else None
        hint = f"did you mean {guess}? " if guess in keys else ""
        return JobSpecError(
            f"{context}: trainer {self.module} has no argument {key} (--{key.replace('_', '-')}), so every site "
            f"would stop at start. Fix: {hint}its arguments are {', '.join(keys)} "
            f"(`fedllm job args {self.template}` describes them)"
        )


def _switch(key: str, value: Any, context: str) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise JobSpecError(
        f"{context}: {key}={value}, but --{key.replace('_', '-')} is a switch; write {key}=true or {key}=false"
    )


def _kind(action: argparse.Action) -> str:
    if action.choices:
        return "one of " + ", ".join(str(c) for c in action.choices)
    return getattr(action.type, "__name__", "text") if action.type else "text"


def _example(action: argparse.Action) -> str:
    if action.choices:
        return str(next(iter(action.choices)))
    return str(action.default) if action.default not in (None, "") else "VALUE"


def coerce_switch_words(args: Mapping[str, Any]) -> dict[str, Any]:
    """Without the trainer's parser: `true`/`false` as written in `-a` become booleans (rendered as switches)."""
    return {
        k: (v.strip().lower() == "true") if isinstance(v, str) and v.strip().lower() in ("true", "false") else v
        for k, v in args.items()
    }


def fedllm_trainers() -> list[str]:
    """The trainer modules fedllm ships (modules under fedllm.training with a `main` and a parser)."""
    import fedllm.training as training

    names = []
    for info in pkgutil.walk_packages(training.__path__, prefix="fedllm.training."):
        if not info.ispkg:
            names.append(info.name)
    return names


def trainer_arguments(trainer: str) -> TrainerArguments:
    """The parser of `trainer` (a module path); TrainerUnavailable where it cannot be loaded on this machine.

    A fedllm module must be there (it ships with fedllm): a misspelt one is a JobSpecError naming the
    modules that are. Another package's trainer may live on the sites only; then the job goes unchecked.
    """
    try:
        found = importlib.util.find_spec(trainer) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        if trainer == "fedllm" or trainer.startswith("fedllm."):
            close = difflib.get_close_matches(trainer, fedllm_trainers(), n=1, cutoff=0.8)
            hint = f"did you mean {close[0]}? " if close else ""
            raise JobSpecError(
                f"trainer {trainer}: no such fedllm module, so every site would fail to start it. "
                f"Fix: {hint}name a trainer module, e.g. fedllm.training.toy.demo_mlp or fedllm.training.hf.lora"
            )
        raise TrainerUnavailable(f"trainer module {trainer} is not installed here")
    try:
        module = importlib.import_module(trainer)
    except ImportError as exc:
        raise TrainerUnavailable(f"importing trainer module {trainer} here fails ({exc})") from None
    except Exception as exc:  # the module's own code failed: it would on every site too
        raise JobSpecError(
            f"trainer {trainer}: importing it fails ({type(exc).__name__}: {exc}); every site would fail the same way. "
            "Fix: the module, or the template's trainer"
        ) from None
    if not callable(getattr(module, "main", None)):
        raise JobSpecError(
            f"trainer {trainer} has no main(), which each site's entry script calls. "
            "Fix: name a trainer module, e.g. fedllm.training.toy.demo_mlp"
        )
    factory = getattr(module, PARSER_FUNCTION, None)
    parser = factory() if callable(factory) else None
    if not isinstance(parser, argparse.ArgumentParser):
        raise TrainerUnavailable(f"trainer module {trainer} has no {PARSER_FUNCTION}() returning its argparse parser")
    return TrainerArguments(trainer, parser)
