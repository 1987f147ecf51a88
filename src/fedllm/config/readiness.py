"""Whether a host is ready for the sites a site config puts on it: what the file alone cannot say.

A site's data folder lives on the site's host (`sites[].host`) and may be made after provisioning
(`fedllm data demo` writes it from the config), so a missing one is not a fault of the file:
`fedllm validate` warns about the sites of the host it runs on and exits 0; `fedllm preflight`, run on
each host right before its sites start, fails on it (the site's container mounts the folder and
`docker compose up` refuses a missing one).
"""

from __future__ import annotations

import socket
from pathlib import Path

from fedllm.config.loader import format_loc, line_locator
from fedllm.config.problems import Problem, display_path
from fedllm.config.site_config import Site, SiteConfig


def local_host_names() -> set[str]:
    """The names under which a site config may put a site on this machine."""
    return {"localhost", socket.gethostname(), socket.getfqdn()}


def data_dir_problem(site: Site, base: Path) -> str | None:
    """Why `site` cannot read its data folder on this machine, or None if the folder is there."""
    path = site.data_path(base)
    if path.is_dir():
        return None
    what = "is not a folder" if path.exists() else "does not exist on this host"
    if site.data_dir:
        return f"site '{site.name}' data folder {display_path(path)} {what}"
    return f"site '{site.name}' has no data_dir, and its default data folder {display_path(path)} {what}"


def data_dir_fix(config_path: Path) -> str:
    """What to do about a missing data folder: where the demo's data comes from, and how paths resolve."""
    return (
        "put the site's data there before it starts (`fedllm data demo -c "
        f"{display_path(config_path)}` writes the demo's), or correct data_dir; a relative data_dir is "
        "relative to the folder fedllm runs in"
    )


def here(config: SiteConfig, hosts: set[str] | None = None) -> tuple[list[Site], list[Site]]:
    """The config's sites on this machine and those on other hosts."""
    hosts = hosts or local_host_names()
    return [s for s in config.sites if s.host in hosts], [s for s in config.sites if s.host not in hosts]


def host_warnings(config: SiteConfig, config_path: Path, base: Path, hosts: set[str] | None = None) -> list[Problem]:
    """Data folders missing on this host for the sites it runs, located in the config file."""
    local, _ = here(config, hosts)
    line_of = line_locator(config_path)
    out = []
    for i, site in enumerate(config.sites):
        problem = data_dir_problem(site, base) if site in local else None
        if problem:
            loc = ("sites", i, "data_dir") if site.data_dir else ("sites", i)
            out.append(
                Problem(display_path(config_path), format_loc(loc), problem, data_dir_fix(config_path), line_of(loc))
            )
    return out
