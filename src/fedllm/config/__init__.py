"""Validated configuration: the site config and the problems reported about config files."""

from fedllm.config.problems import ConfigError, FixableError, Problem
from fedllm.config.site_config import Admin, Server, Site, SiteConfig, load_site_config

__all__ = ["Admin", "ConfigError", "FixableError", "Problem", "Server", "Site", "SiteConfig", "load_site_config"]
