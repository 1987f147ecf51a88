"""Find the files fedllm ships beside its code: provisioning templates, site configs, job templates.

Operators edit them at the repository root (`provision/`, `site_configs/`, `jobs/`); an installed
wheel carries a copy under `fedllm/_resources/` (see pyproject's force-include).
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
_REPO_ROOT = _PACKAGE_DIR.parent.parent


def resource_dir(name: str) -> Path:
    """Return the shipped directory `name` (e.g. "provision/templates"), preferring a checkout's copy."""
    for base in (_REPO_ROOT, _PACKAGE_DIR / "_resources"):
        candidate = base / name
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"fedllm resource directory '{name}' not found in {_REPO_ROOT} or {_PACKAGE_DIR / '_resources'}; "
        "reinstall fedllm (pip install -e . from the repository root)"
    )
