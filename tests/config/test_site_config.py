"""The site config model: every invalid case names file, line, field and fix; shipped configs load."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedllm.config import ConfigError, load_site_config
from fedllm.resources import resource_dir
from tests.support.sites import write_yaml

VALID = """\
project: fedllm
server: {name: server, fed_learn_port: 8002, admin_port: 8003}
admins:
  - {name: admin@nvidia.com, org: nvidia, role: project_admin}
sites:
  - {name: site-1, org: nvidia, gpus: [0, 1]}
  - {name: site-2, org: nvidia, gpus: [2, 3]}
"""


def problems(tmp_path: Path, text: str) -> list[str]:
    path = write_yaml(tmp_path / "cfg.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_site_config(path)
    return [str(p) for p in info.value.problems]


def only(tmp_path: Path, text: str) -> str:
    found = problems(tmp_path, text)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("path", sorted(resource_dir("site_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_site_config_is_valid(path: Path) -> None:
    cfg = load_site_config(path)
    assert cfg.sites and cfg.admins


def test_valid_config_loads_with_defaults(tmp_path: Path) -> None:
    cfg = load_site_config(write_yaml(tmp_path / "cfg.yaml", VALID))
    assert cfg.site_names == ["site-1", "site-2"]
    assert cfg.site("site-2").gpus == [2, 3]
    assert cfg.site("site-1").host == "localhost"
    assert cfg.admin.name == "admin@nvidia.com"


def test_malformed_yaml_reports_the_line(tmp_path: Path) -> None:
    msg = only(
        tmp_path, VALID.replace("  - {name: site-2, org: nvidia, gpus: [2, 3]}", "  - {name: site-2, gpus: [2, 3]")
    )
    assert "cfg.yaml:8: malformed YAML: expected ',' or '}'" in msg
    assert "flow mapping, which starts at line 7" in msg and "Fix:" in msg


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    msg = only(tmp_path, VALID.replace("gpus: [2, 3]", "gpu: [2, 3]"))
    assert "cfg.yaml:7: sites[1].gpu: unknown key 'gpu'" in msg
    assert "did you mean 'gpus'" in msg


def test_unknown_top_level_key(tmp_path: Path) -> None:
    msg = only(tmp_path, VALID + "sitez: []\n")
    assert "sitez: unknown key 'sitez'" in msg and "did you mean 'sites'" in msg


def test_duplicate_site_names(tmp_path: Path) -> None:
    msg = only(tmp_path, VALID.replace("name: site-2", "name: site-1"))
    assert "sites[1].name: duplicate site name 'site-1' (also sites[0], line 6)" in msg
    assert "unique name" in msg


def test_duplicate_admin_names(tmp_path: Path) -> None:
    text = VALID.replace("admins:\n", "admins:\n  - {name: admin@nvidia.com}\n")
    msg = only(tmp_path, text)
    assert "admins[1].name: duplicate admin name 'admin@nvidia.com'" in msg


@pytest.mark.parametrize("bad", ["Site_1", "site 1", "-site", "a" * 64])
def test_site_names_must_be_host_names(tmp_path: Path, bad: str) -> None:
    msg = only(tmp_path, VALID.replace("name: site-1,", f"name: '{bad}',"))
    assert "sites[0].name" in msg and "cannot be used as a host or service name" in msg
    assert "lowercase letters, digits and '-'" in msg


def test_server_name_must_be_a_host_name(tmp_path: Path) -> None:
    msg = only(tmp_path, VALID.replace("name: server,", "name: 'my server',"))
    assert "server.name" in msg and "not a valid host name" in msg


def test_admin_name_must_be_an_email(tmp_path: Path) -> None:
    msg = only(tmp_path, VALID.replace("name: admin@nvidia.com", "name: admin"))
    assert "admins[0].name" in msg and "e-mail" in msg


def test_two_sites_sharing_a_gpu_on_one_host(tmp_path: Path) -> None:
    msg = only(tmp_path, VALID.replace("gpus: [2, 3]", "gpus: [1, 2]"))
    assert "sites[1].gpus[0]: GPU 1 on host 'localhost' is already assigned to site 'site-1'" in msg
    assert "allow_gpu_sharing" in msg


def test_same_gpu_ids_on_different_hosts_are_fine(tmp_path: Path) -> None:
    text = VALID.replace("gpus: [2, 3]}", "gpus: [0, 1], host: node-b}")
    assert load_site_config(write_yaml(tmp_path / "cfg.yaml", text)).site("site-2").host == "node-b"


def test_gpu_sharing_can_be_allowed_explicitly(tmp_path: Path) -> None:
    text = VALID.replace("gpus: [2, 3]", "gpus: [0]") + "allow_gpu_sharing: true\n"
    assert load_site_config(write_yaml(tmp_path / "cfg.yaml", text)).site("site-2").gpus == [0]


@pytest.mark.parametrize("bad, shown", [("-1", "got -1"), ("'1'", "got '1'"), ("1.5", "got 1.5"), ("true", "got True")])
def test_gpu_ids_must_be_non_negative_integers(tmp_path: Path, bad: str, shown: str) -> None:
    msg = only(tmp_path, VALID.replace("gpus: [2, 3]", f"gpus: [2, {bad}]"))
    assert "sites[1].gpus[1]" in msg and shown in msg and "nvidia-smi" in msg


def test_gpu_listed_twice(tmp_path: Path) -> None:
    msg = only(tmp_path, VALID.replace("gpus: [2, 3]", "gpus: [2, 2]"))
    assert "GPU 2 is listed twice" in msg


def test_empty_site_list(tmp_path: Path) -> None:
    text = VALID.split("sites:")[0] + "sites: []\n"
    msg = only(tmp_path, text)
    assert "sites: the sites list is empty" in msg and "add at least one site" in msg


@pytest.mark.parametrize("port", ["0", "70000"])
def test_port_out_of_range(tmp_path: Path, port: str) -> None:
    msg = only(tmp_path, VALID.replace("fed_learn_port: 8002", f"fed_learn_port: {port}"))
    assert "server.fed_learn_port" in msg and "between 1 and 65535" in msg


def test_equal_ports(tmp_path: Path) -> None:
    msg = only(tmp_path, VALID.replace("admin_port: 8003", "admin_port: 8002"))
    assert "server.admin_port: admin_port equals fed_learn_port (8002)" in msg


def test_job_ports_default_and_disable(tmp_path: Path) -> None:
    assert load_site_config(write_yaml(tmp_path / "cfg.yaml", VALID)).server.job_port_range == (8004, 8013)
    text = VALID.replace("admin_port: 8003}", "admin_port: 8003, job_ports: null}")
    assert load_site_config(write_yaml(tmp_path / "cfg.yaml", text)).server.job_port_range is None


@pytest.mark.parametrize("value", ["'9000-8000'", "'8004'", "'1-70000'", "'1000-9000'"])
def test_job_ports_must_be_a_short_range(tmp_path: Path, value: str) -> None:
    msg = only(tmp_path, VALID.replace("admin_port: 8003}", f"admin_port: 8003, job_ports: {value}}}"))
    assert "server.job_ports" in msg and "is not a port range" in msg and "e.g. '8004-8013'" in msg


def test_job_ports_must_not_cover_the_server_ports(tmp_path: Path) -> None:
    found = problems(tmp_path, VALID.replace("admin_port: 8003}", "admin_port: 8003, job_ports: 8000-8009}"))
    assert len(found) == 2
    assert "server.job_ports: job_ports 8000-8009 includes fed_learn_port 8002" in found[0]
    assert "includes admin_port 8003" in found[1] and "job_ports: '8004-8013'" in found[1]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = VALID.replace("name: site-2", "name: site-1").replace("gpus: [2, 3]", "gpus: [1, -2]")
    text = text.replace("admin_port: 8003", "admin_port: 8002").replace("project: fedllm", "project: Fed LLM")
    found = "\n".join(problems(tmp_path, text))
    for expected in (
        "project name 'Fed LLM'",
        "gpus[1]",
        "duplicate site name",
        "already assigned",
        "admin_port equals",
    ):
        assert expected in found


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_site_config(tmp_path / "nope.yaml")


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert "YAML mapping at the top level" in only(tmp_path, "- just\n- a list\n")


def test_duplicate_yaml_keys_are_reported(tmp_path: Path) -> None:
    msg = only(tmp_path, VALID + "project: other\n")
    assert "key 'project' appears twice" in msg


def test_container_settings_and_reserved_admin_name(tmp_path):
    from fedllm.config import load_site_config
    from fedllm.config.problems import ConfigError
    from tests.support.sites import local_config_dict, write_yaml

    data = local_config_dict()
    cfg = load_site_config(write_yaml(tmp_path / "ok.yaml", data))
    assert cfg.container.ulimits.memlock == -1 and cfg.container.ulimits.stack == 67108864
    assert cfg.container.image == "fedllm:latest" and cfg.sites[0].workload == "none"

    data["sites"][0]["name"] = "admin"
    data["sites"][1]["workload"] = "gpt-70b"
    data["container"] = {"ulimits": {"stack": 0}, "image": "Bad Image"}
    with pytest.raises(ConfigError) as err:
        load_site_config(write_yaml(tmp_path / "bad.yaml", data))
    text = str(err.value)
    assert "site name 'admin' is reserved" in text and "sites[0].name" in text
    assert "sites[1].workload" in text and "gpt-20b-ptuning-tp2" in text
    assert "container.ulimits.stack" in text and "container.image" in text


def test_an_unknown_site_name_is_a_clear_error(tmp_path) -> None:
    from fedllm.config.site_config import UnknownSiteError
    from tests.support.sites import local_config_dict

    cfg = load_site_config(write_yaml(tmp_path / "site.yaml", local_config_dict()))
    with pytest.raises(UnknownSiteError, match=r"no site named 'site-9'.*its sites: site-1, site-2, site-3.*Fix:"):
        cfg.site("site-9")
