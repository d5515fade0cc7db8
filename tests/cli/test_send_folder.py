"""``flare-async send KIT DIR --to A --to B``: a Hugging Face checkpoint folder from the admin's
kit through a relay to two sites' inboxes, real processes over mutual TLS: byte for byte, then
quantized (``--quantize q8``) and still loadable by transformers, with its progress shown and one
``sent`` line per site."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from flare_async.security import provision
from flare_async.testing import free_ports
from tests._procs import Proc
from tests.checkpoints._ckpt import digests, llama_folder
from tests.cli.test_cli_send import send

SITES = ["server.eu.site-1", "server.eu.site-2"]


def lines(done: subprocess.CompletedProcess[str]) -> dict[str, dict[str, object]]:
    assert done.returncode == 0, done.stdout + done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    return {str(e["to"]): e for e in events if e["event"] == "sent"}


@pytest.mark.slow  # a deployment: server, relay, two sites and the sender as processes
def test_an_admin_sends_a_checkpoint_folder_through_a_relay_to_two_sites(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM  # noqa: PLC0415

    p_server, p_relay = free_ports(2)
    project = tmp_path / "project.toml"
    project.write_text(f"""
project = "ckpt"
org = "example.org"
[server]
listen = ["tls://127.0.0.1:{p_server}"]
[[relays]]
name = "server.eu"
parent = "tls://127.0.0.1:{p_server}"
listen = ["tls://127.0.0.1:{p_relay}"]
[[clients]]
name = "{SITES[0]}"
parent = "tls://127.0.0.1:{p_relay}"
[[clients]]
name = "{SITES[1]}"
parent = "tls://127.0.0.1:{p_relay}"
[[admins]]
name = "admin@example.org"
""")
    kits = tmp_path / "kits"
    provision(project, kits, now=datetime.now(UTC))
    model = tmp_path / "tiny-llama"
    llama_folder(model, shard="100KB")
    inboxes = {s: tmp_path / "inbox" / s for s in SITES}
    procs: list[Proc] = []
    try:
        procs.append(Proc("server", kits / "server", tmp_path / "server.log", []))
        procs.append(Proc("relay", kits / "server.eu", tmp_path / "relay.log", []))
        for s in SITES:
            procs.append(Proc(s, kits / s, tmp_path / f"{s}.log", ["--inbox", str(inboxes[s])]))
        for proc in procs[2:]:
            proc.wait_for("link-up", role="parent")
        to = [arg for s in SITES for arg in ("--to", s)]

        done = lines(send(kits, model, *to, kit="admin@example.org"))
        assert sorted(done) == SITES
        for s in SITES:
            assert done[s]["files"] == len(digests(model))
            assert digests(inboxes[s] / "tiny-llama") == digests(model)
            stored = next(p for p in procs if p.name == s).wait_for("stored", name="tiny-llama")
            assert stored["files"] == len(digests(model))

        q = send(
            kits,
            model,
            "--to",
            SITES[0],
            "--quantize",
            "q8",
            "--name",
            "q8",
            kit="admin@example.org",
        )
        assert lines(q)[SITES[0]]["quantized"] == "q8"
        assert "100.0%" in q.stderr
        loaded = LlamaForCausalLM.from_pretrained(inboxes[SITES[0]] / "q8")
        assert str(loaded.dtype) == "torch.bfloat16"

        # The same name again: refused in one line, the folder there untouched.
        again = send(kits, model, "--to", SITES[1], kit="admin@example.org")
        assert again.returncode == 1
        last = again.stderr.strip().splitlines()[-1]
        assert last.startswith("flare-async send: error: BadRequest: tiny-llama is already in")
        # A file alone goes to one cell, as it is.
        two = send(kits, model / "config.json", *to, kit="admin@example.org")
        assert two.returncode == 1
        assert "a file goes to one cell" in two.stderr
    finally:
        for proc in reversed(procs):
            proc.stop()


@pytest.mark.parametrize("flag", [["--digest", "sha256"], ["--no-digest"]])
def test_a_folder_refuses_the_single_file_digest_flags(tmp_path: Path, flag: list[str]) -> None:
    """A folder's files always travel with their own digests: the flags that choose a file's
    are refused by name, before any kit is read or any cell joins (not silently ignored).
    (A process of its own: the CLI sets the process's logging up on its stderr.)"""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    done = send(tmp_path, tmp_path / "model", "--to", "x", *flag, kit="nokit")
    assert done.returncode == 1
    assert "--digest and --no-digest are for a single file" in done.stderr
