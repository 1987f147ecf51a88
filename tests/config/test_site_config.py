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


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (VALID.encode().replace(b"site-2", b"site-\xff2"), "cfg.yaml:7: not UTF-8 text: byte 0xff at column 17"),
        (VALID.encode("utf-16"), "cfg.yaml:1: the file is UTF-16 text. Fix: save it as UTF-8"),
        (VALID.encode().replace(b"fedllm", b"fed\x00llm"), "cfg.yaml:1: malformed YAML: special characters"),
        (b"[" * 1000, "cfg.yaml: malformed YAML: nested too deeply"),
    ],
    ids=["latin-1 byte", "utf-16", "NUL", "deep nesting"],
)
def test_unreadable_text_is_a_located_problem(tmp_path: Path, data: bytes, expected: str) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        load_site_config(path)
    (problem,) = info.value.problems
    assert f"/{expected}" in str(problem) and "Fix:" in str(problem)


def test_a_utf8_byte_order_mark_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_bytes(VALID.encode("utf-8-sig"))
    assert load_site_config(path).project == "fedllm"


def test_problems_are_sorted_by_line(tmp_path: Path) -> None:
    # The cross-field problem (line 3) is found after the field problems (lines 6, 7) but listed first.
    text = VALID.replace("admin_port: 8003", "admin_port: 8002").replace("gpus: [0, 1]", "gpus: [-1]")
    text = text.replace("name: site-2,", "name: Site_2,")
    found = problems(tmp_path, text)
    assert [p.split("cfg.yaml:")[1].split(":")[0] for p in found] == ["2", "6", "7"], found


def test_one_gpu_clash_is_one_problem_naming_every_site(tmp_path: Path) -> None:
    text = (
        VALID.replace("gpus: [2, 3]", "gpus: [0]") + "  - {name: site-3, gpus: [0, 0]}\n  - {name: site-4, gpus: [0]}\n"
    )
    found = problems(tmp_path, text)
    assert len(found) == 2, found
    assert "cfg.yaml:7: sites[1].gpus[0]: GPU 0 on host 'localhost' is already assigned to site" in found[0]
    assert "'site-1'; also taken by 'site-3' (line 8), 'site-4' (line 9)" in found[0]
    assert found[1].endswith("cfg.yaml:8: sites[2].gpus: GPU 0 is listed twice. Fix: list each GPU once")


def test_a_gpu_listed_twice_is_refused_even_when_sharing_is_allowed(tmp_path: Path) -> None:
    msg = only(tmp_path, VALID.replace("gpus: [2, 3]", "gpus: [2, 2]") + "allow_gpu_sharing: true\n")
    assert "sites[1].gpus: GPU 2 is listed twice" in msg


def test_a_workload_needs_its_number_of_gpus(tmp_path: Path) -> None:
    msg = only(tmp_path, VALID.replace("gpus: [2, 3]}", "gpus: [2], workload: gpt-20b-ptuning-tp2}"))
    assert "cfg.yaml:7: sites[1].workload: gpt-20b-ptuning-tp2 needs 2 GPU(s) per site" in msg
    assert "the site has 1. Fix: list 2 GPUs in its gpus" in msg
    msg = only(tmp_path, VALID.replace("gpus: [2, 3]}", "workload: gpt-345m-ptuning}"))
    assert "gpt-345m-ptuning needs 1 GPU(s) per site" in msg and "the site has 0" in msg
    text = VALID.replace("gpus: [2, 3]}", "gpus: [2, 3], workload: gpt-20b-ptuning-tp2}")
    assert load_site_config(write_yaml(tmp_path / "ok.yaml", text)).site("site-2").workload == "gpt-20b-ptuning-tp2"


def test_an_unknown_workload_lists_the_known_ones(tmp_path: Path) -> None:
    msg = only(tmp_path, VALID.replace("gpus: [2, 3]}", "gpus: [2, 3], workload: gpt-70b}"))
    assert "sites[1].workload: workload 'gpt-70b' is not one fedllm knows" in msg
    assert "use one of: none, demo-mlp, gpt-345m-ptuning" in msg


@pytest.mark.parametrize("roles", [["member"], ["member", "org_admin"]])
def test_a_federation_needs_an_admin_who_can_submit(tmp_path: Path, roles: list[str]) -> None:
    admins = "".join(f"  - {{name: a{i}@x.org, role: {r}}}\n" for i, r in enumerate(roles))
    text = VALID.replace("  - {name: admin@nvidia.com, org: nvidia, role: project_admin}\n", admins)
    msg = only(tmp_path, text)
    assert "cfg.yaml:3: admins: no admin can submit jobs: NVFlare lets project_admin and lead submit" in msg
    assert "Fix: give one admin role lead" in msg


def test_fedllm_submits_as_a_lead_when_there_is_no_project_admin(tmp_path: Path) -> None:
    text = VALID.replace(
        "  - {name: admin@nvidia.com, org: nvidia, role: project_admin}\n",
        "  - {name: viewer@x.org, role: member}\n  - {name: lead@x.org, role: lead}\n",
    )
    assert load_site_config(write_yaml(tmp_path / "cfg.yaml", text)).admin.name == "lead@x.org"


def test_aliases_are_read_without_blowing_up(tmp_path: Path) -> None:
    # A recursive alias and a "billion laughs" (9^9 leaves through aliases): located problems, at once.
    laughs = ["  l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    laughs += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    text = (
        VALID.replace("project: fedllm", "project: &p [*p]") + "laughs:\n" + "\n".join(laughs) + "\ndescription: *l9\n"
    )
    found = problems(tmp_path, text)
    assert any("cfg.yaml:1: project: Input should be a valid string" in p for p in found), found
    assert any("laughs: unknown key 'laughs'" in p for p in found) and any("description:" in p for p in found)


def test_a_huge_value_is_quoted_short(tmp_path: Path) -> None:
    msg = only(tmp_path, VALID.replace("project: fedllm", "project: " + "x" * 100_000))
    assert "project name 'xxxx" in msg and "…'" in msg and len(msg) < 400


@pytest.mark.parametrize("value", ["'80'", "0", "-8", "true", "4096", ".nan", "[80]"])
def test_gpu_memory_gib_must_be_a_gpu_memory_size(tmp_path: Path, value: str) -> None:
    msg = only(tmp_path, VALID.replace("gpus: [2, 3]}", f"gpus: [2, 3], gpu_memory_gib: {value}}}"))
    assert "cfg.yaml:7: sites[1].gpu_memory_gib: gpu_memory_gib" in msg and "is not a GPU memory size" in msg
    assert "Fix: give each GPU's memory in GiB" in msg and "e.g. 80 for an A100-80GB" in msg


def test_gpu_memory_gib_is_checked_against_the_sites_gpus_and_workload(tmp_path: Path) -> None:
    text = VALID.replace("gpus: [2, 3]}", "gpus: [2, 3], gpu_memory_gib: 80, workload: gpt-20b-ptuning-tp2}")
    assert load_site_config(write_yaml(tmp_path / "ok.yaml", text)).site("site-2").gpu_memory_gib == 80
    assert load_site_config(write_yaml(tmp_path / "absent.yaml", VALID)).site("site-2").gpu_memory_gib is None
    msg = only(tmp_path, text.replace("gpu_memory_gib: 80", "gpu_memory_gib: 40"))
    assert "sites[1].gpu_memory_gib: workload gpt-20b-ptuning-tp2 needs 63.8 GiB on each GPU" in msg
    assert "the site's GPUs have 40 GiB. Fix: give the site GPUs with more memory" in msg
    msg = only(tmp_path, VALID.replace("gpus: [2, 3]}", "gpu_memory_gib: 24}"))
    assert "sites[1].gpu_memory_gib: gpu_memory_gib is set but the site lists no GPUs" in msg
