"""Project files, provisioning, adding a site later, and loading kits, on real files."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import ssl
import stat
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from flare_async.errors import ConfigError, IdentityError
from flare_async.security import (
    CA_DIR,
    Identity,
    Kit,
    Role,
    add_site,
    check_claim,
    client_context,
    identity_from_certificate,
    load_kit,
    load_project,
    peer_identity,
    provision,
    server_context,
)
from flare_async.security._kits import _toml
from flare_async.transport import Link, LinkFacts
from flare_async.wire import Limits, Session

ROOT = Path(__file__).resolve().parents[2]
TWO_TIER = ROOT / "cells" / "topologies" / "two-tier.toml"
NOW = datetime.now(UTC).replace(microsecond=0)
KIT_FILES = {"cert.pem", "key.pem", "ca.pem", "kit.toml"}


def _cert(path: Path | str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _project(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "project.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def kits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kits")
    provision(TWO_TIER, out, now=NOW)
    return out


# ------------------------------------------------------------------------------ provisioning
def test_the_example_topology_loads() -> None:
    project = load_project(TWO_TIER)
    assert project.project == "two-tier"
    assert project.server.name == "server"
    assert [r.name for r in project.relays] == ["server.relay-1"]
    assert [c.name for c in project.clients] == [
        "server.relay-1.site-1",
        "server.relay-1.site-2",
        "server.relay-1.site-3",
    ]
    assert project.clients[2].parent.startswith("wss://")
    assert [a.name for a in project.admins] == ["admin-1"]


def test_provision_writes_a_ca_and_one_kit_per_participant(kits_dir: Path) -> None:
    names = [
        "server",
        "server.relay-1",
        "server.relay-1.site-1",
        "server.relay-1.site-2",
        "server.relay-1.site-3",
        "admin-1",
    ]
    assert sorted(p.name for p in kits_dir.iterdir()) == sorted([CA_DIR, *names])
    ca_dir = kits_dir / CA_DIR
    assert {p.name for p in ca_dir.iterdir()} == {"ca.pem", "ca.key", "issued.toml"}
    assert stat.S_IMODE((ca_dir / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(ca_dir.stat().st_mode) & 0o077 == 0
    ca_pem = (ca_dir / "ca.pem").read_bytes()
    ca_key = (ca_dir / "ca.key").read_bytes()
    ca_cert = _cert(ca_dir / "ca.pem")
    for name in names:
        folder = kits_dir / name
        assert {p.name for p in folder.iterdir()} == KIT_FILES
        assert stat.S_IMODE((folder / "key.pem").stat().st_mode) == 0o600
        assert stat.S_IMODE(folder.stat().st_mode) & 0o077 == 0
        assert (folder / "ca.pem").read_bytes() == ca_pem
        for f in folder.iterdir():  # the CA key is in no kit
            assert f.read_bytes() != ca_key
        cert = _cert(folder / "cert.pem")
        cert.verify_directly_issued_by(ca_cert)
        kit = load_kit(folder, now=NOW)
        assert identity_from_certificate(cert) == kit.identity
        assert kit.identity.name == name


def test_kits_say_who_they_are_and_where_to_connect(kits_dir: Path) -> None:
    server = load_kit(kits_dir / "server")
    relay = load_kit(kits_dir / "server.relay-1")
    site1 = load_kit(kits_dir / "server.relay-1.site-1")
    site3 = load_kit(kits_dir / "server.relay-1.site-3")
    admin = load_kit(kits_dir / "admin-1")
    assert server.identity == Identity("server", Role.SERVER, "example.org")
    assert server.parent is None
    assert server.parent_name is None
    assert server.listen == ("tls://127.0.0.1:18010", "wss://127.0.0.1:18443/flare")
    assert relay.role is Role.RELAY
    assert (relay.parent, relay.parent_name) == ("tls://127.0.0.1:18010", "server")
    assert relay.listen == ("tls://127.0.0.1:18011", "wss://127.0.0.1:18444/flare")
    assert site1.identity == Identity("server.relay-1.site-1", Role.CLIENT, "hospital-a")
    assert (site1.parent, site1.parent_name) == ("tls://127.0.0.1:18011", "server.relay-1")
    assert site1.listen == ()
    assert (site3.parent, site3.parent_name) == ("wss://127.0.0.1:18444/flare", "server.relay-1")
    assert admin.role is Role.ADMIN
    assert admin.parent_name == "server"
    assert site1.project == "two-tier"


def test_listeners_certificates_name_their_hosts(kits_dir: Path) -> None:
    for name in ("server", "server.relay-1"):
        san = (
            _cert(kits_dir / name / "cert.pem")
            .extensions.get_extension_for_class(x509.SubjectAlternativeName)
            .value
        )
        assert san.get_values_for_type(x509.DNSName) == ["localhost"]
        assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    site = _cert(kits_dir / "server.relay-1.site-1" / "cert.pem")
    san = site.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == []


def test_kit_toml_holds_relative_paths_and_load_kit_resolves_them(
    kits_dir: Path, tmp_path: Path
) -> None:
    raw = tomllib.loads((kits_dir / "server.relay-1" / "kit.toml").read_text())
    assert (raw["cert"], raw["key"], raw["ca"]) == ("cert.pem", "key.pem", "ca.pem")
    assert raw["role"] == "relay"
    # A kit works wherever it is copied to, whether given as its folder or its kit.toml.
    moved = tmp_path / "elsewhere" / "relay-kit"
    shutil.copytree(kits_dir / "server.relay-1", moved)
    for path in (moved, moved / "kit.toml"):
        kit = load_kit(path)
        assert Path(kit.cert) == moved.absolute() / "cert.pem"
        assert Path(kit.key).is_absolute()
        assert Path(kit.ca).is_absolute()


def test_provisioned_kits_make_a_working_mutual_tls_link(kits_dir: Path) -> None:
    relay = load_kit(kits_dir / "server.relay-1")
    site = load_kit(kits_dir / "server.relay-1.site-3")
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_context(relay).wrap_bio(s_in, s_out, server_side=True)
    host = site.parent.split("//")[1].split(":")[0] if site.parent else ""
    client = client_context(site).wrap_bio(c_in, c_out, server_hostname=host)
    for _ in range(8):
        for end in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    client.write(b"x")
    s_in.write(c_out.read())
    assert server.read(1) == b"x"
    child = peer_identity(server)
    check_claim(child, site.name, "client", below=relay.name)
    parent = peer_identity(client)
    assert parent.name == site.parent_name
    check_claim(parent, "server.relay-1", "relay")


class _TlsLink:
    """What a verifier sees of a link: the peer's certificate, verified by mutual TLS."""

    peer_address = "tls://127.0.0.1:1"

    def __init__(self, kit: Kit) -> None:
        self.der = _cert(kit.cert).public_bytes(serialization.Encoding.DER)

    def extra(self) -> LinkFacts:
        return LinkFacts(peer_certificate=self.der)


def _accept_child(at: Kit, child: Kit, claimed: str | None = None) -> None:
    """``at``'s kit verifier on a child link from ``child``'s certificate claiming ``claimed``."""
    from flare_async.cli._kit import kit_verifier  # noqa: PLC0415

    session = Session(claimed or child.name, "child", 1, frozenset(), Limits(), 0.0)
    kit_verifier(at)(cast("Link", _TlsLink(child)), session)


def test_a_cell_links_only_directly_below_the_cell_its_name_places_it(kits_dir: Path) -> None:
    """The kits' topology holds on the links: a site's valid certificate does not let it skip
    its relay and attach below the server (nor below a sibling), whatever the transport."""
    server, relay = load_kit(kits_dir / "server"), load_kit(kits_dir / "server.relay-1")
    site = load_kit(kits_dir / "server.relay-1.site-1")
    sibling = load_kit(kits_dir / "server.relay-1.site-2")
    _accept_child(relay, site)
    _accept_child(server, relay)
    with pytest.raises(IdentityError, match=r"directly below 'server\.relay-1', not 'server'"):
        _accept_child(server, site)
    with pytest.raises(IdentityError, match="not below"):
        _accept_child(sibling, site)
    with pytest.raises(IdentityError, match=r"certificate is for 'server\.relay-1\.site-1'"):
        _accept_child(server, site, "server.site-1")


def test_provision_refuses_to_overwrite_unless_forced(kits_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "kits"
    shutil.copytree(kits_dir, out)
    before = _snapshot(out)
    with pytest.raises(ConfigError, match="already holds ca, server"):
        provision(TWO_TIER, out, now=NOW)
    assert _snapshot(out) == before
    (out / "stray.txt").write_text("left alone")
    provision(TWO_TIER, out, now=NOW, force=True)
    after = _snapshot(out)
    assert after["ca/ca.pem"] != before["ca/ca.pem"]  # a new CA
    assert after["server/key.pem"] != before["server/key.pem"]
    assert (out / "stray.txt").read_text() == "left alone"
    assert stat.S_IMODE((out / "server" / "key.pem").stat().st_mode) == 0o600
    _cert(out / "server" / "cert.pem").verify_directly_issued_by(_cert(out / "ca" / "ca.pem"))


def test_a_kit_folder_alone_also_blocks_provisioning(tmp_path: Path) -> None:
    out = tmp_path / "kits"
    (out / "server.relay-1.site-2").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"already holds server\.relay-1\.site-2;"):
        provision(TWO_TIER, out, now=NOW)
    assert [p.name for p in out.iterdir()] == ["server.relay-1.site-2"]


def test_a_bad_project_writes_nothing(tmp_path: Path) -> None:
    project = _project(
        tmp_path,
        """project = "p"
[server]
listen = ["tls://127.0.0.1:9000"]
[[clients]]
name = "elsewhere.site-1"
org = "x"
parent = "tls://127.0.0.1:9000"
""",
    )
    out = tmp_path / "kits"
    with pytest.raises(ConfigError, match="must be named directly below its parent 'server'"):
        provision(project, out, now=NOW)
    assert not out.exists()
    with pytest.raises(ConfigError, match="timezone-aware"):
        provision(TWO_TIER, out, now=datetime(2026, 1, 1))
    assert not out.exists()


# ------------------------------------------------------------------------------- add a site
def test_add_site_issues_one_kit_and_touches_no_other(kits_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "kits"
    shutil.copytree(kits_dir, out)
    before = _snapshot(out)
    issued_before = (out / "ca" / "issued.toml").read_text()
    kit = add_site(out, "server.relay-1.site-4", "tls://127.0.0.1:18011", "hospital-d", now=NOW)
    after = _snapshot(out)
    changed = {k for k in before if after[k] != before[k]}
    assert changed == {"ca/issued.toml"}
    assert (out / "ca" / "issued.toml").read_text().startswith(issued_before)  # appended only
    assert set(after) - set(before) == {f"server.relay-1.site-4/{f}" for f in KIT_FILES}
    assert kit.identity == Identity("server.relay-1.site-4", Role.CLIENT, "hospital-d")
    assert (kit.parent, kit.parent_name) == ("tls://127.0.0.1:18011", "server.relay-1")
    assert load_kit(out / "server.relay-1.site-4", now=NOW) == kit
    _cert(kit.cert).verify_directly_issued_by(_cert(out / "ca" / "ca.pem"))
    assert stat.S_IMODE(Path(kit.key).stat().st_mode) == 0o600
    registry = tomllib.loads((out / "ca" / "issued.toml").read_text())
    assert registry["participants"][-1]["name"] == "server.relay-1.site-4"
    assert registry["participants"][-1]["serial"] == f"{_cert(kit.cert).serial_number:x}"


def test_add_site_grows_the_tree_with_new_relays(kits_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "kits"
    shutil.copytree(kits_dir, out)
    relay = add_site(
        out,
        "server.relay-2",
        "wss://localhost:18443/flare",  # the server through its `hosts` alias
        role="relay",
        listen=["tls://0.0.0.0:18012"],
        hosts=["relay-2.example.org"],
        now=NOW,
    )
    assert relay.parent_name == "server"
    assert relay.listen == ("tls://0.0.0.0:18012",)
    san = _cert(relay.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["relay-2.example.org"]
    assert san.value.get_values_for_type(x509.IPAddress) == []  # 0.0.0.0 is no address
    site = add_site(out, "server.relay-2.site-1", "tls://RELAY-2.example.org:18012", now=NOW)
    assert site.parent_name == "server.relay-2"
    assert site.org == "example.org"  # the project's default
    admin = add_site(out, "ops@example.org", None, role="admin", now=NOW)
    assert (admin.parent, admin.parent_name) == ("tls://127.0.0.1:18010", "server")


@pytest.mark.parametrize(
    ("name", "parent", "kwargs", "match"),
    [
        ("server.relay-1.site-1", "tls://127.0.0.1:18011", {}, "already issued"),
        ("server.relay-1.SITE-1", "tls://127.0.0.1:18011", {}, "differing by case"),
        ("server.site-9", "tls://127.0.0.1:18011", {}, "below its parent 'server.relay-1'"),
        ("server.relay-1.site-9", "tls://127.0.0.1:18010", {}, "directly below its parent"),
        ("server.relay-1.site-9", "tls://127.0.0.1:19999", {}, "not a listen URL"),
        ("server.relay-1.site-9", "tcp://127.0.0.1:18011", {}, "must use tls:// or wss://"),
        ("server.relay-1.site-9", None, {}, "needs a parent URL"),
        ("server.relay-1.site 9", "tls://127.0.0.1:18011", {}, "must match"),
        ("server.relay-1.site-9", "tls://127.0.0.1:18011", {"role": "server"}, "one server"),
        ("server.relay-1.site-9", "tls://127.0.0.1:18011", {"role": "boss"}, "unknown role"),
        ("server.relay-1.r", "tls://127.0.0.1:18011", {"role": "relay"}, "at least one URL"),
        ("server.relay-1.site-9", "tls://127.0.0.1:18011", {"listen": ["tls://h:1"]}, "relays"),
        ("ca", None, {"role": "admin"}, "reserved"),
        (
            "server.relay-1.r",
            "tls://127.0.0.1:18011",
            {"role": "relay", "listen": ["wss://127.0.0.1:18443/flare"]},
            "used by both 'server' and 'server.relay-1.r'",
        ),
    ],
)
def test_add_site_refuses_what_does_not_fit(
    kits_dir: Path,
    tmp_path: Path,
    name: str,
    parent: str | None,
    kwargs: dict[str, object],
    match: str,
) -> None:
    out = tmp_path / "kits"
    shutil.copytree(kits_dir, out)
    before = _snapshot(out)
    with pytest.raises(ConfigError, match=match):
        add_site(out, name, parent, now=NOW, **kwargs)  # type: ignore[arg-type]
    assert _snapshot(out) == before


def test_add_site_with_force_reissues_a_lost_kit(kits_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "kits"
    shutil.copytree(kits_dir, out)
    old_key = (out / "server.relay-1.site-2" / "key.pem").read_bytes()
    kit = add_site(out, "server.relay-1.site-2", "tls://127.0.0.1:18011", "b", now=NOW, force=True)
    assert Path(kit.key).read_bytes() != old_key
    assert load_kit(out / "server.relay-1.site-2").org == "b"
    shutil.rmtree(out / "server.relay-1.site-1")  # shipped and deleted here: still issued
    with pytest.raises(ConfigError, match="already issued"):
        add_site(out, "server.relay-1.site-1", "tls://127.0.0.1:18011", now=NOW)


def test_add_site_needs_a_provisioned_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="holds no provisioned CA"):
        add_site(tmp_path, "server.site-1", "tls://127.0.0.1:18010", now=NOW)


# -------------------------------------------------------------------------------- load_kit
def test_load_kit_refuses_a_certificate_that_is_not_the_kits(
    kits_dir: Path, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    shutil.copytree(kits_dir / "server.relay-1.site-1", site)
    load_kit(site)
    shutil.copy(kits_dir / "server.relay-1.site-2" / "cert.pem", site / "cert.pem")
    with pytest.raises(
        ConfigError, match=r"its certificate is for client 'server\.relay-1\.site-2'"
    ):
        load_kit(site)
    shutil.copy(kits_dir / "server.relay-1.site-1" / "cert.pem", site / "cert.pem")
    shutil.copy(kits_dir / "server.relay-1.site-2" / "key.pem", site / "key.pem")
    with pytest.raises(ConfigError, match="does not belong"):
        load_kit(site)
    (site / "key.pem").unlink()
    with pytest.raises(ConfigError, match=r"key\.pem"):
        load_kit(site)
    with pytest.raises(ConfigError, match="cannot read kit"):
        load_kit(tmp_path / "nowhere")
    (site / "kit.toml").write_text('name = "server.relay-1.site-1"\nrole = "overlord"\n')
    with pytest.raises(ConfigError, match=r"kit\.toml"):
        load_kit(site)


def test_load_kit_can_refuse_an_expired_certificate(kits_dir: Path) -> None:
    kit = kits_dir / "server.relay-1.site-1"
    load_kit(kit, now=NOW)
    with pytest.raises(ConfigError, match="not at"):
        load_kit(kit, now=NOW + timedelta(days=366))
    with pytest.raises(ConfigError, match="not at"):
        load_kit(kit, now=NOW - timedelta(hours=1))


# --------------------------------------------------------------------------- project rules
BASE = """project = "p"
org = "o"
[server]
listen = ["tls://127.0.0.1:9000", "wss://fl.example.org:9443/flare"]
"""


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ('[[clients]]\nname = "server.a"\nparent = "tls://127.0.0.1:9000"\ncolour = "red"\n',
         "unknown field `colour`"),
        ('[[clients]]\nname = "server.a"\n', "missing required field `parent`"),
        ('[[clients]]\nname = "server.a"\nparent = "tls://127.0.0.1:9001"\n',
         "not a listen URL"),
        ('[[clients]]\nname = "server.a"\nparent = "wss://fl.example.org:9443/other"\n',
         "not a listen URL"),
        ('[[clients]]\nname = "server.a"\nparent = "tls://127.0.0.1"\n', "fixed port"),
        ('[[clients]]\nname = "server.a"\nparent = "tls://127.0.0.1:9000/x"\n', "takes no path"),
        ('[[clients]]\nname = "server.a"\nparent = "ws://127.0.0.1:9000"\n', "tls:// or wss://"),
        ('[[clients]]\nname = "other.a"\nparent = "tls://127.0.0.1:9000"\n', "below its parent"),
        ('[[clients]]\nname = "server"\nparent = "tls://127.0.0.1:9000"\n', "below its parent"),
        ('[[clients]]\nname = "server.r.site-1"\nparent = "tls://127.0.0.1:9000"\n',
         "directly below its parent 'server'"),
        ('[[clients]]\nname = "server.a"\nparent = "tls://127.0.0.1:9000"\n'
         '[[clients]]\nname = "server.a"\nparent = "tls://127.0.0.1:9000"\n', "used twice"),
        ('[[clients]]\nname = "server.a b"\nparent = "tls://127.0.0.1:9000"\n', "must match"),
        ('[[admins]]\nname = "server"\n', "used twice"),
        ('[[admins]]\nname = "CA"\n', "reserved"),
        ('[[admins]]\nname = "a/b"\n', "admin name"),
        ('[[relays]]\nname = "server.r"\nparent = "tls://127.0.0.1:9000"\n'
         'listen = ["tls://0.0.0.0:9001"]\n', "wildcard addresses only"),
        ('[[relays]]\nname = "server.r"\nparent = "tls://127.0.0.1:9000"\nlisten = []\n',
         "at least one URL"),
        ('[[relays]]\nname = "server.r"\nparent = "tls://127.0.0.1:9000"\n'
         'listen = ["tls://127.0.0.1:9000"]\n', "used by both 'server' and 'server.r'"),
        ('[[relays]]\nname = "server.r"\nparent = "tls://127.0.0.1:9000"\n'
         'listen = ["tls://127.0.0.1:9001"]\nhosts = ["fl.example.org"]\n'
         '[[relays]]\nname = "server.s"\nparent = "tls://fl.example.org:9001"\n'
         'listen = ["tls://127.0.0.2:9001"]\nhosts = ["fl.example.org"]\n', "ambiguous"),
        ('[[relays]]\nname = "server.r"\nparent = "tls://127.0.0.1:9000"\n'
         'listen = ["tls://127.0.0.1:9001"]\nhosts = ["bad host"]\n', "nor a DNS host name"),
    ],
)  # fmt: skip
def test_project_rules(tmp_path: Path, extra: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        load_project(_project(tmp_path, BASE + extra))
    assert "project.toml" in str(info.value)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("project = ", "project.toml"),
        ('project = "p"\n', "missing required field `server`"),
        ('project = "-p"\n[server]\nlisten = ["tls://h:1"]\n', "project name"),
        ('project = "p"\n[server]\nname = "a.b"\nlisten = ["tls://h:1"]\n', None),
        ('project = "p"\n[server]\nlisten = []\n', "at least one URL"),
    ],
)
def test_project_file_shape(tmp_path: Path, text: str, match: str | None) -> None:
    path = _project(tmp_path, text)
    if match is None:
        assert load_project(path).server.name == "a.b"  # any valid cell name may be the root
    else:
        with pytest.raises(ConfigError, match=match):
            load_project(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_project(tmp_path / "missing.toml")


def test_parent_urls_match_by_host_alias_case_and_ip_form(tmp_path: Path) -> None:
    project = _project(
        tmp_path,
        """project = "p"
[server]
org = "o"
listen = ["tls://0.0.0.0:9000", "tls://[::1]:9001"]
hosts = ["FL.example.org", "10.0.0.1"]
[[relays]]
name = "server.r"
org = "o"
parent = "tls://fl.EXAMPLE.org:9000"
listen = ["wss://[0:0::1]:9443"]
[[clients]]
name = "server.r.a"
org = "o"
parent = "wss://[::1]:9443/"
[[clients]]
name = "server.b"
org = "o"
parent = "tls://10.0.0.1:9000"
[[clients]]
name = "server.c"
org = "o"
parent = "tls://[0::1]:9001"
""",
    )
    kits = {k.name: k for k in provision(project, tmp_path / "kits", now=NOW)}
    assert kits["server.r"].parent_name == "server"
    assert kits["server.r.a"].parent_name == "server.r"
    assert kits["server.b"].parent_name == "server"
    assert kits["server.c"].parent_name == "server"
    san = (
        _cert(kits["server"].cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    ).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["::1", "10.0.0.1"]


def test_org_may_be_left_out(tmp_path: Path) -> None:
    project = _project(tmp_path, 'project = "p"\n[server]\nlisten = ["tls://localhost:9000"]\n')
    (kit,) = provision(project, tmp_path / "kits", now=NOW)
    assert kit.org == ""
    assert load_kit(tmp_path / "kits" / "server").identity == Identity("server", Role.SERVER, "")


# ------------------------------------------------------------------------------ tiny TOML
@given(
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs"])),
    st.lists(st.text(max_size=8), max_size=4),
    st.integers(-(2**63), 2**63 - 1),
    st.booleans(),
)
def test_the_toml_writer_round_trips(text: str, items: list[str], n: int, flag: bool) -> None:
    table = {"text": text, "items": items, "n": n, "flag": flag, "gone": None}
    back = tomllib.loads(_toml(table))
    expected = {"items": items, "n": n, "flag": flag}
    if text:
        expected["text"] = text
    assert back == expected


def test_kits_are_plain_structs() -> None:
    kit = Kit(name="server", role=Role.SERVER)
    assert kit.identity == Identity("server", Role.SERVER)
    assert (kit.cert, kit.key, kit.ca) == ("cert.pem", "key.pem", "ca.pem")


def test_a_tree_by_fanout_expands_to_explicit_cells(tmp_path: Path) -> None:
    spec = tmp_path / "tree.toml"
    spec.write_text(
        'project = "t"\n[tree]\nfanout = [2, 3]\nport = 30100\norgs = ["a", "b"]\n'
        '[[admins]]\nname = "admin-1"\n'
    )
    project = load_project(spec)
    assert project.server.listen == ("tls://127.0.0.1:30100",)
    assert [(r.name, r.parent, r.listen) for r in project.relays] == [
        ("server.relay-1", "tls://127.0.0.1:30100", ("tls://127.0.0.1:30101",)),
        ("server.relay-2", "tls://127.0.0.1:30100", ("tls://127.0.0.1:30102",)),
    ]
    assert [(c.name, c.parent, c.org) for c in project.clients] == [
        ("server.relay-1.site-1", "tls://127.0.0.1:30101", "a"),
        ("server.relay-1.site-2", "tls://127.0.0.1:30101", "b"),
        ("server.relay-1.site-3", "tls://127.0.0.1:30101", "a"),
        ("server.relay-2.site-4", "tls://127.0.0.1:30102", "b"),
        ("server.relay-2.site-5", "tls://127.0.0.1:30102", "a"),
        ("server.relay-2.site-6", "tls://127.0.0.1:30102", "b"),
    ]
    assert project.admins[0].name == "admin-1"
    bad = {
        "fanout = []\nport = 30100": "at least one level",
        "fanout = [2, 0]\nport = 30100": "at least one level",
        "fanout = [2]\nport = 99999": "out of range",
        "fanout = [2]\nport = 30100\nspeed = 3": "speed",
    }
    for body, why in bad.items():
        spec.write_text(f'project = "t"\n[tree]\n{body}\n')
        with pytest.raises(ConfigError, match=why):
            load_project(spec)
    spec.write_text(
        'project = "t"\n[tree]\nfanout = [2]\nport = 30100\n'
        '[server]\nlisten = ["tls://127.0.0.1:1"]\n'
    )
    with pytest.raises(ConfigError, match="remove server"):
        load_project(spec)
