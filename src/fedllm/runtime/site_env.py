"""The environment a site process gets, derived from its own kit (never from other sites')."""

from __future__ import annotations

import json
from pathlib import Path

from fedllm.provision.builders import SITE_FILE_NAME

# NVFlare's server keeps a finished job RUNNING until every site that ran it reports its outcome, up to
# 900 s by default: one site that died mid-job holds the status for 15 minutes. Live sites report within
# seconds of the job's end (all weights have crossed by then), so two minutes loses nothing.
SERVER_ENVIRONMENT = {"NVFLARE_CLIENT_OUTCOME_WAIT_TIMEOUT": "120"}


def read_site_file(kit: Path) -> dict:
    path = kit / "local" / SITE_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this kit was not provisioned by fedllm; run `fedllm provision`")
    return json.loads(path.read_text())


def site_environment(kit: Path) -> dict[str, str]:
    """Variables that pin a site to its GPUs and tell its training code where its data is.

    CUDA_VISIBLE_DEVICES lists exactly the site's GPUs (empty: none, the site trains on CPU),
    which is what `device_ids` does for the site's container.
    """
    info = read_site_file(kit)
    return {
        "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in info["gpus"]),
        "FEDLLM_SITE_NAME": info["name"],
        "FEDLLM_DATA_DIR": info["data_dir"],
    }
