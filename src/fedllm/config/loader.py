"""Load YAML into pydantic models, turning every failure into a located Problem.

This is the only place in fedllm that parses YAML config files: the loaders for
site configs and job templates call `load_model`, everything else reads the
validated objects.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from fedllm.config.problems import ConfigError, FixableError, Problem, display_path

M = TypeVar("M", bound=BaseModel)
Path_ = tuple[str | int, ...]


def _line_map(node: yaml.Node, path: Path_, lines: dict[Path_, int], dups: list[tuple[Path_, int]]) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                dups.append(((*path, key), key_node.start_mark.line + 1))
            seen.add(key)
            lines[(*path, key)] = key_node.start_mark.line + 1
            _line_map(value_node, (*path, key), lines, dups)
            # Keep the key's own line for the mapping entry (values may start on the next line).
            lines[(*path, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, (*path, i), lines, dups)


def format_loc(loc: Path_) -> str:
    """`('sites', 1, 'gpus', 0)` -> `sites[1].gpus[0]`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _nearest_line(lines: dict[Path_, int], loc: Path_) -> int | None:
    for i in range(len(loc), -1, -1):
        if loc[:i] in lines:
            return lines[loc[:i]]
    return None


def _allowed_keys(model: type[BaseModel], loc: Path_) -> list[str]:
    """Walk the model's fields along `loc` to list the keys allowed at that place."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        current = _inner_model(annotation)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


# Fix text for pydantic's built-in error types; our own validators raise FixableError instead.
_GENERIC_FIXES: dict[str, str] = {
    "missing": "add this required key",
    "int_type": "use a whole number without quotes",
    "int_parsing": "use a whole number without quotes",
    "int_from_float": "use a whole number",
    "string_type": "use a string (quote it if YAML reads it as something else)",
    "bool_type": "use true or false",
    "list_type": "use a YAML list, e.g. [0, 1]",
    "dict_type": "use a YAML mapping (key: value)",
    "model_type": "use a YAML mapping (key: value)",
    "greater_than_equal": "use a larger value",
    "less_than_equal": "use a smaller value",
    "greater_than": "use a larger value",
    "too_short": "add at least one entry",
    "literal_error": "use one of the allowed values",
    "enum": "use one of the allowed values",
}


def problems_from_validation_error(
    err: ValidationError,
    model: type[BaseModel],
    file: str,
    lines: dict[Path_, int],
    field_fixes: dict[str, str] | None = None,
) -> list[Problem]:
    problems = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        field = format_loc(loc)
        line = _nearest_line(lines, loc)
        ctx_error = (e.get("ctx") or {}).get("error")
        if isinstance(ctx_error, FixableError):
            problems.append(Problem(file, field, ctx_error.message, ctx_error.fix, line))
            continue
        if e["type"] == "extra_forbidden":
            key = str(loc[-1])
            allowed = _allowed_keys(model, loc[:-1])
            close = difflib.get_close_matches(key, allowed, n=1)
            fix = f"did you mean '{close[0]}'? " if close else "remove it or correct its spelling; "
            fix += f"allowed keys here: {', '.join(allowed)}" if allowed else ""
            problems.append(Problem(file, field, f"unknown key '{key}'", fix.rstrip("; "), line))
            continue
        value = e.get("input")
        shown = f" (got {value!r})" if e["type"] != "missing" and not isinstance(value, dict | list) else ""
        named = [p for p in loc if isinstance(p, str)]
        fix = (field_fixes or {}).get(named[-1] if named else "") if e["type"] != "missing" else None
        fix = fix or _GENERIC_FIXES.get(e["type"], "correct the value")
        problems.append(Problem(file, field, f"{e['msg']}{shown}", fix, line))
    return problems


def load_model(
    path: Path | str,
    model: type[M],
    *,
    kind: str,
    extra_checks: Callable[[Any, Callable[[Path_], int | None]], list[tuple[Path_, str, str]]] | None = None,
    context: dict[str, Any] | None = None,
    field_fixes: dict[str, str] | None = None,
) -> M:
    """Parse `path` as YAML and validate it as `model`, reporting every problem at once.

    `extra_checks(raw, line_of)` returns (location, message, fix) triples for rules that
    span several fields; it runs on the raw data so it still reports when some fields
    are individually invalid. `field_fixes` maps a field name to the fix shown when its
    value has the wrong type or range. Raises ConfigError listing all problems.
    """
    path = Path(path)
    file = display_path(path)
    if not path.is_file():
        raise ConfigError(
            [Problem(file, "", "file not found", "check the path, or copy a template from site_configs/")], kind
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigError(
            [Problem(file, "", f"not UTF-8 text (byte {exc.start}: {exc.reason})", "save it as UTF-8 YAML", line)],
            kind,
        ) from None
    try:
        root = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (control characters)
        line = text[: exc.position].count("\n") + 1
        char = f" (character #x{exc.character:04x})" if isinstance(exc.character, int) else ""
        raise ConfigError(
            [Problem(file, "", f"malformed YAML: {exc.reason}{char}", "remove that character from this line", line)],
            kind,
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        msg = f"malformed YAML: {exc.problem or exc}"
        if exc.context and exc.context_mark and exc.context_mark is not mark:
            msg += f" ({exc.context}, which starts at line {exc.context_mark.line + 1})"
        raise ConfigError(
            [Problem(file, "", msg, "fix the YAML syntax at this line (indentation, ':' and quotes)", line)], kind
        ) from None

    lines: dict[Path_, int] = {}
    dups: list[tuple[Path_, int]] = []
    if root is not None:
        _line_map(root, (), lines, dups)
    problems = [
        Problem(file, format_loc(loc), f"key '{loc[-1]}' appears twice", "keep only one of them", line)
        for loc, line in dups
    ]
    if not isinstance(raw, dict):
        problems.append(
            Problem(file, "", "the file must contain a YAML mapping at the top level", "see site_configs/", 1)
        )
        raise ConfigError(problems, kind)

    def line_of(loc: Path_) -> int | None:
        return _nearest_line(lines, loc)

    result: M | None = None
    try:
        result = model.model_validate(raw, context=context)
    except ValidationError as err:
        problems += problems_from_validation_error(err, model, file, lines, field_fixes)
    if extra_checks is not None:
        problems += [
            Problem(file, format_loc(loc), msg, fix, line_of(loc)) for loc, msg, fix in extra_checks(raw, line_of)
        ]
    if problems or result is None:
        raise ConfigError(problems, kind)
    return result
