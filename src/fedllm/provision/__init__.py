"""Provisioning: NVFlare's provisioner fed by the site config, plus fedllm's Builders."""

from fedllm.provision.provisioner import (
    Kits,
    ProvisionError,
    config_digest,
    latest_kits,
    provision,
    provisioned_config,
)

__all__ = ["Kits", "ProvisionError", "config_digest", "latest_kits", "provision", "provisioned_config"]
