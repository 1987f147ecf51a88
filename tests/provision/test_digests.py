"""Kits remember the config they were made from (its digest); planning-only fields are not part of it."""

from __future__ import annotations

import copy

from fedllm.config.site_config import SiteConfig
from fedllm.provision.provisioner import config_digest, participant_digest
from tests.support.sites import local_config_dict


def test_a_sites_gpu_memory_plans_jobs_and_needs_no_new_kits() -> None:
    data = local_config_dict(sites=2, gpus=[[0], [1]])
    sized = copy.deepcopy(data)
    sized["sites"][0]["gpu_memory_gib"] = 24
    before, after = SiteConfig.model_validate(data), SiteConfig.model_validate(sized)
    assert config_digest(before) == config_digest(after)
    assert participant_digest(before, "site-1") == participant_digest(after, "site-1")


def test_a_gpu_edit_needs_new_kits() -> None:
    data = local_config_dict(sites=2, gpus=[[0], [1]])
    moved = copy.deepcopy(data)
    moved["sites"][0]["gpus"] = [2]
    before, after = SiteConfig.model_validate(data), SiteConfig.model_validate(moved)
    assert config_digest(before) != config_digest(after)
    assert participant_digest(before, "site-1") != participant_digest(after, "site-1")
    assert participant_digest(before, "site-2") == participant_digest(after, "site-2")
