"""The README's layout table names exactly the packages and top-level modules in src/fedllm."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "src" / "fedllm"


def _layout_paths() -> set[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Layout\n", 1)[1].split("\n## ", 1)[0]
    first_cells = [row.split("|")[1] for row in section.splitlines() if row.startswith("| `")]
    return {path for cell in first_cells for path in re.findall(r"`([^`]+)`", cell)}


def test_layout_table_lists_every_package_and_module_and_nothing_else() -> None:
    listed = _layout_paths()
    packages = {f"src/fedllm/{p.name}/" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    listed_packages = {p for p in listed if p.startswith("src/fedllm/") and p.endswith("/")}
    assert listed_packages == packages, "README layout rows vs src/fedllm packages differ"
    modules = {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    names = {path.removeprefix("src/fedllm/") for path in listed}
    assert modules <= names, f"top-level modules missing from the README layout: {sorted(modules - names)}"
    for path in listed:
        if "/" in path and "<" not in path:  # a repository path (not a pattern): it must exist
            assert (REPO / path).exists(), f"README layout names {path}, which does not exist"
