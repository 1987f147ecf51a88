"""Multi-organization trust, with a real NVFlare server and real certificates.

Every participant (server, three sites in two orgs, three admins) makes its own key in its own folder
with `fedllm cert request`; the project admin signs with `fedllm cert sign` (it receives request zips,
returns signed zips, never a key); each participant packages its own kit with `fedllm package`. The
federation then runs from those kits, each left in its owner's folder:

    root/project-admin/ca/                 the root CA (the only key the project admin holds)
    root/project-admin/{inbox,outbox}/     request zips in, signed zips out
    root/participants/<name>/request/      the participant's key and CSR
    root/participants/<name>/workspace/    its kit, built by NVFlare's `nvflare package`
    root/participants/<site>/data/         a site's data
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from nvflare.fuel.flare_api.api_spec import AuthorizationError, InvalidTarget

from fedllm.apps.local_federation import LocalFederation, running_federation
from fedllm.config import load_site_config
from fedllm.config.site_config import SiteConfig
from fedllm.jobs.create import create_job, resolve_spec
from fedllm.jobs.submit import COMPLETED, submit_job
from fedllm.jobs.template import load_template
from fedllm.provision.certificates import CertificateError, check_kit_certificate
from fedllm.provision.distributed import (
    CertificateAuthority,
    assemble_kits,
    init_ca,
    package_kit,
    request_certificate,
    sign_request,
)
from fedllm.results.metrics import read_round_metrics
from fedllm.runtime import native
from fedllm.runtime.admin import AdminKit, admin_session, connected_sites
from fedllm.training.toy.demo_mlp import write_demo_data
from tests.support.exchange import echo_job
from tests.support.sites import local_config_dict, write_yaml
from tests.support.trust import (
    FoundKey,
    admin_console,
    cert_public_key,
    csr_public_key,
    private_keys_under,
    sign_with_validity,
    tls_outcome,
)

pytestmark = pytest.mark.federation

LEAD_A, LEAD_B, MEMBER_B = "lead@orga.com", "lead@orgb.com", "member@orgb.com"


def _config_dict() -> dict:
    data = local_config_dict(project="fedorgs")
    data["server"]["org"] = "orga"
    for site, org in zip(data["sites"], ("orga", "orgb", "orgb"), strict=True):
        site["org"] = org
        site["data_dir"] = f"participants/{site['name']}/data"
    data["admins"] = [
        {"name": LEAD_A, "org": "orga", "role": "lead"},
        {"name": LEAD_B, "org": "orgb", "role": "lead"},
        {"name": MEMBER_B, "org": "orgb", "role": "member"},
    ]
    return data


@dataclass
class Trust:
    root: Path
    config: SiteConfig
    ca: CertificateAuthority
    fed: LocalFederation | None = None  # once every kit is made
    # Every private key found under root after each step of the flow, and where.
    scans: dict[str, list[FoundKey]] = field(default_factory=dict)

    @property
    def kits(self):
        assert self.fed is not None
        return self.fed.kits

    def home(self, name: str) -> Path:
        return self.root / "participants" / name

    def kit(self, name: str) -> Path:
        return self.kits.kit(name)

    def admin_kit(self, name: str) -> AdminKit:
        return AdminKit.open(self.kit(name))

    def provision(self, name: str, *, force: bool = False) -> Path:
        """One participant's round trip: request at home, sign at the project admin, package at home."""
        home, admin = self.home(name), self.root / "project-admin"
        req = request_certificate(
            self.config, name, home / "request", source="site.yaml", data_root=self.root, force=force
        )
        self.scans[f"{name}: requested"] = private_keys_under(self.root)
        inbox = admin / "inbox" / req.request_zip.name  # the only file that travels to the project admin
        inbox.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(req.request_zip, inbox)
        signed = sign_request(
            self.config, inbox, self.ca.ca_dir, out=admin / "outbox" / f"{name}.signed.zip", force=force
        )
        self.scans[f"{name}: signed"] = private_keys_under(self.root)
        returned = home / "inbox" / signed.signed_zip.name  # the only file that travels back
        returned.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(signed.signed_zip, returned)
        kit = package_kit(returned, req.request_dir, home / "workspace", self.ca.fingerprint, force=force)
        self.scans[f"{name}: packaged"] = private_keys_under(self.root)
        return kit


@pytest.fixture(scope="module")
def trust(tmp_path_factory) -> Iterator[Trust]:
    root = tmp_path_factory.mktemp("trust")
    with pytest.MonkeyPatch.context() as mp:
        # NVFlare's own records (~/.nvflare audit) and temporary files stay where the key scans look.
        mp.setenv("HOME", str(root / "home"))
        (root / "tmp").mkdir()
        mp.setenv("TMPDIR", str(root / "tmp"))
        config = load_site_config(write_yaml(root / "site.yaml", _config_dict()))
        sites = [root / "participants" / s / "data" for s in config.site_names]
        write_demo_data(sites, root / "participants" / "shared-validation.npz")
        ca = init_ca(config, root / "project-admin" / "ca")
        world = Trust(root, config, ca)
        names = [config.server.name, *config.site_names, *(a.name for a in config.admins)]
        kits = assemble_kits(config, {name: world.provision(name) for name in names})
        with running_federation(kits, echo=lambda _m: None) as fed:
            world.fed = fed
            yield world


def _echo_job(out: Path, name: str) -> Path:
    """A job that keeps running (many quick rounds of a 1 MiB model): something to submit and abort."""
    return echo_job(out, 1, sites=3, rounds=500, name=name, verify=False)


def _wait_finished(session, job_id: str, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while not (status := session.get_job_meta(job_id).get("status", "")).startswith("FINISHED"):
        assert time.monotonic() < deadline, f"job {job_id} still {status} after abort"
        time.sleep(1)
    return status


@pytest.fixture
def running_job(trust: Trust, tmp_path: Path) -> Iterator[str]:
    """A job submitted by lead@orga.com (the config's first admin), aborted by it afterwards."""
    with admin_session(trust.kits) as session:
        job_id = session.submit_job(str(_echo_job(tmp_path, "echo-of-lead-a")))
        deadline = time.monotonic() + 60
        while session.get_job_meta(job_id).get("status") != "RUNNING":
            assert time.monotonic() < deadline, "the echo job did not start"
            time.sleep(0.5)
    yield job_id
    with admin_session(trust.kits) as session:
        session.abort_job(job_id)
        _wait_finished(session, job_id)


def _status(trust: Trust, job_id: str) -> str:
    with admin_session(trust.kits) as session:
        return session.get_job_meta(job_id).get("status", "")


def test_a_site_cannot_register_under_another_sites_name(trust: Trust) -> None:
    # site-1 runs a copy of its own kit (its real certificate and key) but says it is site-2.
    impostor = trust.home("site-1") / "impostor"
    shutil.copytree(trust.kit("site-1"), impostor)
    log = trust.home("site-1") / "impostor.log"
    server_log = trust.kit(trust.config.server.name) / "log.txt"
    reason = "authenticated as 'site-1' but claimed endpoint 'site-2' requires identity 'site-2'"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-u", "-m", "nvflare.private.fed.app.client.client_train", "-m", str(impostor)]
    cmd += ["-s", "fed_client.json", "--set", "secure_train=true", "uid=site-2", "org=orgb", "config_folder=config"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=impostor, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 45
        while reason not in server_log.read_text(errors="replace"):
            assert time.monotonic() < deadline, (
                f"the server's log never said why it refused the impostor:\n{log.read_text()[-3000:]}"
            )
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert "Successfully registered client:site-2" not in log.read_text(errors="replace")
    with admin_session(trust.kits) as session:
        assert connected_sites(session) >= {"site-1", "site-2", "site-3"}


def test_a_sites_certificate_opens_no_admin_rights(trust: Trust, tmp_path: Path) -> None:
    # site-1 dresses its own certificate and key as an admin kit (in its own folder) and logs in as itself.
    fake = trust.home("site-1") / "as-admin"
    shutil.copytree(trust.kit(LEAD_A), fake, ignore=shutil.ignore_patterns("client.*"))
    for name in ("client.crt", "client.key"):
        shutil.copy(trust.kit("site-1") / "startup" / name, fake / "startup" / name)
    with admin_session(AdminKit(fake, "site-1")) as session:
        for command in (session.list_jobs, session.get_connected_client_list, lambda: session.ls_target("site-1")):
            with pytest.raises((AuthorizationError, InvalidTarget)):
                command()
        with pytest.raises(AuthorizationError, match="not authorized for 'submit_job'"):
            session.submit_job(str(_echo_job(tmp_path, "echo-by-a-site")))


def test_sites_listen_on_loopback_only(trust: Trust) -> None:
    """A site dials the server; what it listens on is NVFlare's internal port for its own job processes."""
    for proc in native.read_state(trust.kits):
        tree = {proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))}
        sockets = [c.laddr for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid in tree]
        if proc.name in trust.config.site_names:
            assert sockets and all(addr.ip == "127.0.0.1" for addr in sockets), (proc.name, sockets)


def test_member_can_neither_submit_nor_abort_and_a_lead_acts_for_its_own_jobs_and_org(
    trust: Trust, running_job: str, tmp_path: Path
) -> None:
    """NVFlare's default policy (each kit's local/authorization.json.default), through the FLARE API."""
    job = _echo_job(tmp_path, "echo-attempt")
    with admin_session(trust.admin_kit(MEMBER_B)) as member:
        assert running_job in {j["job_id"] for j in member.list_jobs()}  # view: any
        with pytest.raises(AuthorizationError, match="not authorized for 'submit_job'"):
            member.submit_job(str(job))
        with pytest.raises(AuthorizationError, match="not authorized for 'abort_job'"):
            member.abort_job(running_job)
        with pytest.raises(AuthorizationError):
            member.ls_target("site-2")  # a member only views, even its own org's site
    with admin_session(trust.admin_kit(LEAD_B)) as lead_b:
        # manage_job: n:submitter — not the job of lead@orga.com ...
        with pytest.raises(AuthorizationError, match="not authorized for 'abort_job'"):
            lead_b.abort_job(running_job)
        # ... shell_commands: o:site — a site of its own org, not another org's.
        assert running_job in lead_b.ls_target("site-2")
        with pytest.raises(AuthorizationError):
            lead_b.ls_target("site-1")
        # submit_job: any; its own job it may abort.
        own = lead_b.submit_job(str(job))
        lead_b.abort_job(own)
        assert _wait_finished(lead_b, own).startswith("FINISHED:ABORTED")
    assert _status(trust, running_job) == "RUNNING"


def test_the_admin_console_enforces_the_same_roles(trust: Trust, running_job: str, tmp_path: Path) -> None:
    job = _echo_job(tmp_path, "echo-console")
    # abort_job asks for confirmation before it goes to the server: "y".
    out = admin_console(trust.kit(MEMBER_B), [MEMBER_B, f"submit_job {job}", f"abort_job {running_job}", "y"])
    assert f"user '{MEMBER_B}' is not authorized for 'submit_job'" in out, out
    assert f"user '{MEMBER_B}' is not authorized for 'abort_job'" in out, out
    out = admin_console(trust.kit(LEAD_B), [LEAD_B, f"abort_job {running_job}", "y", "ls site-2"])
    assert f"user '{LEAD_B}' is not authorized for 'abort_job'" in out, out
    assert running_job in out, out  # `ls site-2` lists the job's folder on its own org's site
    out = admin_console(trust.kit(LEAD_B), [LEAD_B, "ls site-1"])
    assert "not authorized" in out, out
    assert _status(trust, running_job) == "RUNNING"


def test_an_expired_certificate_is_refused_with_a_clear_message(trust: Trust) -> None:
    # site-3's own key, certified by the project's CA — for a validity that ended yesterday.
    now = dt.datetime.now(dt.timezone.utc)
    pem = sign_with_validity(
        trust.ca.ca_dir,
        trust.home("site-3") / "request" / "site-3.csr",
        "orgb",
        "client",
        now - dt.timedelta(days=30),
        now - dt.timedelta(days=1),
    )
    expired = trust.home("site-3") / "expired-kit"
    shutil.copytree(trust.kit("site-3"), expired)
    (expired / "startup" / "client.crt").write_bytes(pem)

    # fedllm says so before starting anything (NVFlare's site would retry its connection without a word) ...
    with pytest.raises(CertificateError, match=r"certificate of 'site-3' .* expired at .* the server refuses it"):
        check_kit_certificate(expired)
    # ... and the real server refuses it in the TLS handshake, while the same key's valid certificate gets in.
    server = trust.config.server
    root_ca = trust.kit(server.name) / "startup" / "rootCA.pem"
    startup = trust.kit("site-3") / "startup"
    assert (
        tls_outcome(root_ca, startup / "client.crt", startup / "client.key", server.name, server.fed_learn_port)
        == "open"
    )
    refused = tls_outcome(
        root_ca, expired / "startup" / "client.crt", startup / "client.key", server.name, server.fed_learn_port
    )
    assert refused.startswith("refused") and "EXPIRED" in refused.upper(), refused


def _startup_files(kit: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((kit / "startup").iterdir())}


def test_rotating_one_sites_key_leaves_every_other_kit_valid(trust: Trust) -> None:
    others = [n for n in [trust.config.server.name, "site-1", "site-3", LEAD_A, LEAD_B, MEMBER_B]]
    before = {n: _startup_files(trust.kit(n)) for n in others}
    old_cert = cert_public_key(trust.kit("site-2") / "startup" / "client.crt")

    # site-2 makes a new key, the project admin signs its new request, site-2 re-packages and restarts.
    kit = trust.provision("site-2", force=True)
    assert kit == trust.kit("site-2")
    native.restart_site(trust.kits, "site-2", echo=lambda _m: None)

    new_cert = cert_public_key(kit / "startup" / "client.crt")
    assert new_cert != old_cert
    assert new_cert == csr_public_key(trust.home("site-2") / "request" / "site-2.csr")
    # NVFlare kept the old key, inside site-2's own request folder.
    (old_key_dir,) = (trust.home("site-2") / "request" / ".bak").iterdir()
    assert (old_key_dir / "site-2.key").is_file()
    # Nothing of any other participant changed, and every kit still holds a valid certificate of the same CA.
    assert {n: _startup_files(trust.kit(n)) for n in others} == before
    for name in [*others, "site-2"]:
        check_kit_certificate(trust.kit(name))
    with admin_session(trust.kits) as session:
        assert connected_sites(session) >= {"site-1", "site-2", "site-3"}


def test_the_demo_job_runs_to_completion_on_kits_made_the_distributed_way(trust: Trust, tmp_path: Path) -> None:
    # Submitted and downloaded by lead@orga.com (the config's first admin): no project_admin exists here.
    job = create_job(resolve_spec(load_template("demo-mlp"), "fedavg", rounds=2), tmp_path / "jobs")
    result = submit_job(trust.kits, job, download=tmp_path / "results", timeout=600, echo=lambda _m: None)
    assert result.status == COMPLETED
    rounds = read_round_metrics(result.result_dir)
    assert [r["round"] for r in rounds] == [0, 1]
    for r in rounds:
        assert set(r["sites"]) == {"site-1", "site-2", "site-3"}
    assert rounds[-1]["aggregated"]["global_val_accuracy"] > 0.5


def _owners(trust: Trust) -> dict[str, Path]:
    """Whose each key is (by its public key), and the folder it may live in."""
    owners = {cert_public_key(trust.ca.ca_dir / "rootCA.pem"): trust.ca.ca_dir}
    for home in (trust.root / "participants").iterdir():
        for csr in (home / "request").rglob("*.csr") if (home / "request").is_dir() else []:
            owners[csr_public_key(csr)] = home
    return owners


def test_no_private_key_ever_leaves_its_owners_folder(trust: Trust) -> None:
    """Checked after every request, signature and packaging above, and now, after the federation ran jobs."""
    trust.scans["after the federation ran"] = private_keys_under(trust.root)
    owners = _owners(trust)
    assert len(owners) == 1 + 7 + 1, "one CA key, seven participants' keys, and site-2's rotated one"
    misplaced = []
    for step, found in trust.scans.items():
        for key in found:
            home = owners.get(key.public_key_sha256)
            if home is None or not key.path.is_relative_to(home):
                misplaced.append(f"{step}: {key.path} (belongs to {home})")
    assert not misplaced, "\n".join(misplaced)
    # The project admin's folder holds one key, its CA's; the zips that travelled carry none.
    admin_keys = [
        k.path for k in trust.scans["after the federation ran"] if k.path.is_relative_to(trust.root / "project-admin")
    ]
    assert admin_keys == [trust.ca.ca_dir / "rootCA.key"]
    for zipped in (trust.root / "project-admin").rglob("*.zip"):
        with zipfile.ZipFile(zipped) as zf:
            for member in zf.namelist():
                assert b"PRIVATE KEY" not in zf.read(member), f"{zipped}:{member}"
    # Each participant's key is in its own folder only: its request folder and its kit.
    final = trust.scans["after the federation ran"]
    for name in ["site-1", "site-3", LEAD_B]:
        pub = cert_public_key(trust.kit(name) / "startup" / "client.crt")
        places = sorted(k.path for k in final if k.public_key_sha256 == pub)
        assert all(p.is_relative_to(trust.home(name)) for p in places) and len(places) >= 2, places
    with contextlib.suppress(FileNotFoundError):
        assert not private_keys_under(trust.root / "home") and not private_keys_under(trust.root / "tmp")
