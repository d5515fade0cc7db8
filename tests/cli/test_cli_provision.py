"""``flare-async provision`` end to end, through the CLI's ``main``."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest
from cryptography import x509

from flare_async.cli import main
from flare_async.security import Identity, Role, load_kit

ROOT = Path(__file__).resolve().parents[2]
TWO_TIER = ROOT / "cells" / "topologies" / "two-tier.toml"
CELLS = [
    "server",
    "server.relay-1",
    "server.relay-1.site-1",
    "server.relay-1.site-2",
    "server.relay-1.site-3",
]


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _provisioned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    out = tmp_path / "kits"
    assert main(["provision", str(TWO_TIER), "-o", str(out)]) == 0
    capsys.readouterr()
    return out


def test_provision_writes_kits_and_says_what_it_wrote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "kits"
    assert main(["provision", str(TWO_TIER), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert lines[0] == f"provisioned 6 kits of project 'two-tier' in {out}:"
    assert "ca/" in lines[1]
    assert "secret" in lines[1]
    for name in [*CELLS, "admin-1"]:
        assert any(line.split()[0] == f"{name}/" for line in lines), name
        kit = load_kit(out / name)
        assert kit.name == name
    site3 = next(line for line in lines if line.startswith("  server.relay-1.site-3/"))
    assert "client" in site3
    assert "hospital-c" in site3
    assert "parent wss://127.0.0.1:18444/flare" in site3
    assert stat.S_IMODE((out / "ca" / "ca.key").stat().st_mode) == 0o600
    assert load_kit(out / "server.relay-1").identity == Identity(
        "server.relay-1", Role.RELAY, "example.org"
    )


def test_add_site_adds_one_kit_and_leaves_the_others_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _provisioned(tmp_path, capsys)
    before = _snapshot(out)
    status = main(
        [
            "provision",
            "--add-site",
            "server.relay-1.site-4",
            "--parent",
            "tls://127.0.0.1:18011",
            "--org",
            "hospital-d",
            "-o",
            str(out),
        ]
    )
    assert status == 0
    captured = capsys.readouterr()
    assert "server.relay-1.site-4/" in captured.out
    assert "hospital-d" in captured.out
    after = _snapshot(out)
    assert {k for k in before if after[k] != before[k]} == {"ca/issued.toml"}
    kit = load_kit(out / "server.relay-1.site-4")
    assert kit.identity == Identity("server.relay-1.site-4", Role.CLIENT, "hospital-d")
    assert kit.parent_name == "server.relay-1"
    ca = x509.load_pem_x509_certificate((out / "ca" / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate(Path(kit.cert).read_bytes())
    cert.verify_directly_issued_by(ca)


def test_add_a_relay_then_a_site_below_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _provisioned(tmp_path, capsys)
    relay_args = ["--role", "relay", "--listen", "tls://0.0.0.0:18020", "--host", "r2.example"]
    args = ["provision", "--add-site", "server.relay-2", "--parent", "tls://127.0.0.1:18010"]
    assert main([*args, *relay_args, "-o", str(out), "--days", "30"]) == 0
    relay = load_kit(out / "server.relay-2")
    assert relay.role is Role.RELAY
    assert relay.listen == ("tls://0.0.0.0:18020",)
    cert = x509.load_pem_x509_certificate(Path(relay.cert).read_bytes())
    validity = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 30 * 86400 <= validity.total_seconds() <= 30 * 86400 + 3600
    site = [
        "provision",
        "--add-site",
        "server.relay-2.site-1",
        "--parent",
        "tls://r2.example:18020",
    ]
    assert main([*site, "-o", str(out)]) == 0
    assert load_kit(out / "server.relay-2.site-1").parent_name == "server.relay-2"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["provision", "-o", "{out}"], "give a PROJECT file"),
        (["provision", "{project}", "--add-site", "server.x", "-o", "{out}"], "not both"),
        (["provision", "--add-site", "server.x", "-o", "{out}"], "needs --parent"),
        (["provision", "{project}", "--parent", "tls://h:1", "-o", "{out}"], "with --add-site"),
        (["provision", "{project}", "--listen", "tls://h:1", "-o", "{out}"], "with --add-site"),
    ],
)
def test_usage_errors_exit_2_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    out = tmp_path / "kits"
    args = [a.format(out=out, project=TWO_TIER) for a in argv]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""
    assert not out.exists()


def test_config_errors_exit_1_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _provisioned(tmp_path, capsys)
    before = _snapshot(out)
    assert main(["provision", str(TWO_TIER), "-o", str(out)]) == 1
    assert "already holds ca" in capsys.readouterr().err
    args = ["provision", "--add-site", "server.site-9", "--parent", "tls://127.0.0.1:18011"]
    assert main([*args, "-o", str(out)]) == 1
    assert "below its parent 'server.relay-1'" in capsys.readouterr().err
    assert _snapshot(out) == before
    bad = tmp_path / "bad.toml"
    bad.write_text('project = "p"\n[server]\nlisten = ["tcp://127.0.0.1:1"]\n')
    assert main(["provision", str(bad), "-o", str(tmp_path / "other")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("flare-async provision: error: ")
    assert "bad.toml" in err
    assert "tls:// or wss://" in err


def test_force_reprovisions_with_a_new_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _provisioned(tmp_path, capsys)
    old_ca = (out / "ca" / "ca.pem").read_bytes()
    assert main(["provision", str(TWO_TIER), "-o", str(out), "--force"]) == 0
    assert (out / "ca" / "ca.pem").read_bytes() != old_ca
    assert (out / "server" / "ca.pem").read_bytes() == (out / "ca" / "ca.pem").read_bytes()


def test_version_still_works(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.startswith("flare-async ")
