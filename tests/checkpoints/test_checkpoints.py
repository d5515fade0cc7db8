"""Checkpoint folders between cells (flare_async.checkpoints), in one process: a sharded Hugging
Face checkpoint through a relay to several sites byte for byte, quantized on the wire and still
loadable by transformers in its own dtype, resumed with only the files a site lacks, and every
malformed or hostile announcement, stream and commit refused by name with nothing put in place."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import numpy as np
import pytest

from flare_async import Cell, MemoryNetwork
from flare_async.checkpoints import (
    FileEntry,
    Manifest,
    Opened,
    StoredCheckpoint,
    _quantized,
    scan,
    send_checkpoint,
)
from flare_async.checkpoints._manifest import check_manifest, check_path
from flare_async.checkpoints._quantized import ShardWriter, records
from flare_async.cli._send import inbox_handlers
from flare_async.codecs import encode
from flare_async.errors import (
    BadRequest,
    ConfigError,
    DecodeError,
    StreamCorrupted,
    Unauthorized,
    Unreachable,
)
from tests.checkpoints._ckpt import digests, llama_folder

pytestmark = pytest.mark.anyio
SITES = ["server.eu.site-1", "server.eu.site-2"]


@pytest.fixture(
    params=[pytest.param(("asyncio", {}), id="asyncio"), pytest.param(("trio", {}), id="trio")]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param  # type: ignore[no-any-return]  # real clocks: files in worker threads


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bf16 Llama in three shards with its index, config and a tokenizer file."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    llama_folder(folder, shard="100KB")
    return folder


@contextlib.asynccontextmanager
async def tree(
    tmp: Path, cells: dict[str, Cell] | None = None, **policy: Any
) -> AsyncIterator[Cell]:
    """server -> server.eu (relay) -> the sites, each with its inbox at ``tmp/<site>``; the
    site cells into ``cells``."""
    net = MemoryNetwork()
    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(
            Cell("server", listen=["memory://s"], drivers=[net])
        )
        await stack.enter_async_context(
            Cell("server.eu", listen=["memory://eu"], parent="memory://s", drivers=[net])
        )
        for site in SITES:
            # a site's inbox as `flare-async run` mounts it, its policy at the cell as well
            table = inbox_handlers(tmp / site, **policy)
            cell = Cell(
                site,
                parent="memory://eu",
                drivers=[net],
                handlers=[table],
                accept=policy.get("accepts"),
            )
            await stack.enter_async_context(cell)
            await cell.wait_parent()
            if cells is not None:
                cells[site] = cell
        yield server


def objects_sent(cell: Cell) -> int:
    """Objects ``cell`` sent: streamed, or whole in one request (small files, the manifest)."""
    counts = cell.statistics().streams
    return counts.sent + counts.inline_sent


async def stream_file(cell: Cell, manifest: Manifest, entry: FileEntry, folder: Path) -> Any:
    """One ``files/ckpt-file`` stream as the sender makes it (byte for byte, its SHA-256
    announced): what the tests send by hand to stop a transfer part way."""
    return await cell.stream(
        SITES[0],
        "files",
        "ckpt-file",
        folder / entry.path,
        sha256=f"sha256:{entry.sha256}",
        headers={"id": manifest.id, "path": entry.path},
    )


async def test_a_sharded_checkpoint_reaches_every_site_byte_for_byte_once_through_the_relay(
    hf: Path, tmp_path: Path
) -> None:
    seen: list[tuple[int, int]] = []
    async with tree(tmp_path) as server:
        out = await send_checkpoint(
            server, hf, [*SITES, "server.eu.site-9"], progress=lambda d, t: seen.append((d, t))
        )
        streams = objects_sent(server)
    manifest = scan(hf)
    assert len(manifest.files) >= 6
    assert sum(".safetensors" in f.path for f in manifest.files) >= 3
    for site in SITES:
        assert out[site] == StoredCheckpoint(
            "tiny-llama", len(manifest.files), manifest.total, False
        )
        assert digests(tmp_path / site / "tiny-llama") == digests(hf)
        assert sorted(p.name for p in (tmp_path / site).iterdir()) == ["tiny-llama"]  # no staging
    assert isinstance(out["server.eu.site-9"], Unreachable)  # failed alone
    # one stream per file to the relay's fan-out, the open and the commit, and the open asked
    # twice more of site-9 alone (Unreachable: the path, worth another try)
    assert streams == len(manifest.files) + 2 + 2
    assert seen[-1] == (manifest.total, manifest.total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


@pytest.mark.parametrize("scheme", ["q8", "nf4", "fp16", "bf16"])
async def test_a_quantized_checkpoint_loads_in_transformers_in_its_own_dtype(
    hf: Path, tmp_path: Path, scheme: str
) -> None:
    import torch  # noqa: PLC0415
    from transformers import LlamaForCausalLM  # noqa: PLC0415

    async with tree(tmp_path) as server:
        out = await send_checkpoint(server, hf, SITES[:1], quantize=scheme, name="q")
    assert isinstance(out[SITES[0]], StoredCheckpoint)
    got = tmp_path / SITES[0] / "q"
    src, dst = digests(hf), digests(got)
    for path, digest in src.items():  # what is not a tensor file arrives as it was
        assert (dst[path] == digest) == (scheme == "bf16" or not path.endswith(".safetensors"))
    model = LlamaForCausalLM.from_pretrained(got)
    base = LlamaForCausalLM.from_pretrained(hf)
    assert model.dtype == torch.bfloat16
    bound = {"q8": 1 / 127, "nf4": 0.31, "fp16": 2**-8, "bf16": 0.0}[scheme]
    for (name, w), (name0, w0) in zip(
        model.state_dict().items(), base.state_dict().items(), strict=True
    ):
        assert name == name0
        assert w.dtype == w0.dtype
        assert w.shape == w0.shape
        err = (w.float() - w0.float()).abs().max().item()
        assert err <= bound * w0.float().abs().max().item() + 1e-6, (name, err)
    ids = torch.arange(16).reshape(1, 16)
    with torch.no_grad():
        logits, logits0 = model(ids).logits, base(ids).logits
    assert torch.isfinite(logits).all()
    assert torch.corrcoef(torch.stack([logits.flatten(), logits0.flatten()]).float())[0, 1] > 0.9


async def test_sending_again_resumes_with_only_the_files_a_site_lacks(
    hf: Path, tmp_path: Path
) -> None:
    manifest = scan(hf)
    shard = next(f for f in manifest.files if f.path.endswith(".safetensors"))
    async with tree(tmp_path) as server:
        # A first attempt that got as far as one shard (then, say, the sender died).
        reply = await server.stream(SITES[0], "files", "ckpt-open", msgspec.json.encode(manifest))
        assert msgspec.json.decode(reply.tobytes(), type=Opened).have == ()
        await stream_file(server, manifest, shard, hf)
        reply = await server.stream(SITES[0], "files", "ckpt-open", msgspec.json.encode(manifest))
        assert msgspec.json.decode(reply.tobytes(), type=Opened).have == (shard.path,)
        before = objects_sent(server)
        out = await send_checkpoint(server, hf, SITES[0])
        # the open, the files it lacked, the commit
        assert objects_sent(server) - before == 1 + len(manifest.files) - 1 + 1
    assert isinstance(out[SITES[0]], StoredCheckpoint)
    assert digests(tmp_path / SITES[0] / "tiny-llama") == digests(hf)


async def test_what_a_crash_left_in_staging_is_not_committed(hf: Path, tmp_path: Path) -> None:
    """A site killed inside a file (an older version wrote it into staging), or anything else
    that is not the manifest's: the resumed transfer commits the checkpoint's files only."""
    manifest = scan(hf)
    staging = tmp_path / SITES[0] / f".incoming-ckpt-{manifest.id}"
    (staging / "sub").mkdir(parents=True)
    (staging / ".incoming-ckpt-0123456789abcdef.part").write_bytes(b"x" * 1000)
    (staging / "sub" / "junk.bin").write_bytes(b"junk")
    async with tree(tmp_path) as server:
        out = await send_checkpoint(server, hf, SITES[0])
    assert isinstance(out[SITES[0]], StoredCheckpoint)
    assert digests(tmp_path / SITES[0] / "tiny-llama") == digests(hf)
    assert sorted(p.name for p in (tmp_path / SITES[0]).iterdir()) == ["tiny-llama"]


async def test_a_transfer_goes_on_after_the_receiver_restarted(hf: Path, tmp_path: Path) -> None:
    """The open manifest is kept beside the staging folder: a site that restarted (new cells,
    new handler tables, the same inbox) takes the next files and the commit without a new
    open."""
    manifest = scan(hf)
    first, *rest = manifest.files
    async with tree(tmp_path) as server:
        await server.stream(SITES[0], "files", "ckpt-open", msgspec.json.encode(manifest))
        await stream_file(server, manifest, first, hf)
    async with tree(tmp_path) as server:  # the site again, knowing nothing in memory
        for f in rest:
            await stream_file(server, manifest, f, hf)
        reply = await server.stream(SITES[0], "files", "ckpt-commit", manifest.id.encode())
    assert msgspec.json.decode(reply.tobytes(), type=StoredCheckpoint).files == len(manifest.files)
    assert digests(tmp_path / SITES[0] / "tiny-llama") == digests(hf)
    assert sorted(p.name for p in (tmp_path / SITES[0]).iterdir()) == ["tiny-llama"]


async def test_what_abandoned_transfers_left_goes_after_a_week(hf: Path, tmp_path: Path) -> None:
    inbox = tmp_path / SITES[0]
    inbox.mkdir()
    old_staging, old_file, fresh = (
        inbox / ".incoming-ckpt-0123",
        inbox / ".incoming-ckpt-0123-aa.part",
        inbox / ".incoming-ckpt-4567",
    )
    old_staging.mkdir()
    (old_staging / "model.safetensors").write_bytes(b"x")
    old_file.write_bytes(b"x")
    fresh.mkdir()
    week = time.time() - 7 * 86400 - 60
    for path in (old_staging, old_file):
        os.utime(path, (week, week))
    async with tree(tmp_path) as server:
        out = await send_checkpoint(server, hf, SITES[0])
    assert isinstance(out[SITES[0]], StoredCheckpoint)
    assert sorted(p.name for p in inbox.iterdir()) == [fresh.name, "tiny-llama"]


async def test_a_name_in_the_inbox_is_refused_unless_overwritten(hf: Path, tmp_path: Path) -> None:
    async with tree(tmp_path) as server:
        assert isinstance((await send_checkpoint(server, hf, SITES[0]))[SITES[0]], StoredCheckpoint)
        (tmp_path / SITES[0] / "tiny-llama" / "extra.txt").write_text("mine")
        again = (await send_checkpoint(server, hf, SITES[0]))[SITES[0]]
        assert isinstance(again, BadRequest)
        assert "--overwrite" in str(again)
        assert (tmp_path / SITES[0] / "tiny-llama" / "extra.txt").exists()
        done = (await send_checkpoint(server, hf, SITES[0], overwrite=True))[SITES[0]]
    assert isinstance(done, StoredCheckpoint)
    assert done.replaced
    assert digests(tmp_path / SITES[0] / "tiny-llama") == digests(hf)  # replaced whole


async def test_a_site_policy_judges_checkpoints_by_their_origin_through_the_relay(
    hf: Path, tmp_path: Path
) -> None:
    allowed = {"server"}
    asked: set[tuple[str, str, str]] = set()

    def accepts(src: str, channel: str, topic: str) -> bool:
        asked.add((src, channel, topic))
        return src in allowed

    cells: dict[str, Cell] = {}
    async with tree(tmp_path, cells, accepts=accepts) as server:
        # fanned out by server.eu, judged as the server's (the stream's origin)
        ok = await send_checkpoint(server, hf, SITES)
        allowed.clear()
        allowed.add("server.eu")  # a rule for the relay does not admit the server's
        refused = await send_checkpoint(server, hf, SITES, name="again")
        # a cell that is not above the site cannot claim an origin
        allowed.add("server")
        # nor send a file through the relay's fan-out to pass for the relay (or the server)
        fanned = await cells[SITES[1]].stream_many(
            [SITES[0], "server.eu.site-9"], "files", "put", b"evil", headers={"name": "evil.txt"}
        )
        assert isinstance(fanned[SITES[0]], Unauthorized), fanned
        with pytest.raises(Unauthorized, match=r"from server\.eu\.site-2"):
            await cells[SITES[1]].stream(
                SITES[0],
                "files",
                "ckpt-open",
                msgspec.json.encode(Manifest("x", scan(hf).files)),
                headers={"fanout-origin": "server"},
            )
    assert all(isinstance(o, StoredCheckpoint) for o in ok.values()), ok
    assert all(isinstance(o, Unauthorized) for o in refused.values()), refused
    assert {c for _, c, _ in asked} == {"files"}  # the same files/* rules as files/put
    assert {t for _, _, t in asked} >= {"ckpt-open", "ckpt-file", "ckpt-commit", "put"}
    for site in SITES:
        assert sorted(p.name for p in (tmp_path / site).iterdir()) == ["tiny-llama"]


def entry(path: str, **kw: Any) -> FileEntry:
    return FileEntry(path, kw.pop("size", 1), kw.pop("sha256", "0" * 64), **kw)


@pytest.mark.parametrize(
    "path",
    [
        "../x",
        "/etc/passwd",
        "a/../b",
        ".git/config",
        "a/.hidden",
        "x.part",
        "a//b",
        "a\\b",
        "",
        "a\x00",
        "x" * 256,
        "\u00e9" * 128,  # 256 bytes in UTF-8
        "a\nb",
        "a\x7f",
        "a/" * 600,
    ],
)
def test_paths_a_receiver_refuses(path: str) -> None:
    with pytest.raises(BadRequest):
        check_path(path)


@pytest.mark.parametrize(
    "files",
    [
        (),
        (entry("a"), entry("a")),
        (entry("a"), entry("a/b")),  # a file and a folder of one name
        (entry("A"), entry("a")),  # only the case differs
        (entry("a", size=-1),),
        (entry("a", sha256="xyz"),),
        (entry("a", sha256="A" * 64),),
        (entry("a/b"), entry("a")),  # the folder first
        (entry("A"), entry("a/b")),  # and in another case
        (entry("a", size=(1 << 40) + 1),),  # past 1 TiB
        (entry("a", header=b"\x02\x00\x00\x00\x00\x00\x00\x00{}"),),  # header, not quantized
        (entry("a.safetensors", quant="int3"),),
        (entry("a.safetensors", quant="q8", header=b"\x02\x00\x00\x00\x00\x00\x00\x00{}"),),
    ],
)
def test_manifests_a_receiver_refuses(files: tuple[FileEntry, ...]) -> None:
    with pytest.raises(BadRequest):
        check_manifest(Manifest("m", files))


async def test_hostile_announcements_streams_and_commits_put_nothing_in_place(
    hf: Path, tmp_path: Path
) -> None:
    manifest = scan(hf)
    config = next(f for f in manifest.files if f.path == "config.json")
    site = SITES[0]
    async with tree(tmp_path) as server:

        async def refused(topic: str, body: bytes, match: str) -> None:
            with pytest.raises(BadRequest, match=match):
                await server.stream(site, "files", topic, body)

        await refused("ckpt-open", b"{not json", "not a checkpoint manifest")
        await refused(
            "ckpt-open", msgspec.json.encode(Manifest("..", manifest.files)), "acceptable"
        )
        await refused(
            "ckpt-open", msgspec.json.encode(Manifest("a/b", manifest.files)), "plain folder"
        )
        await refused("ckpt-commit", b"0" * 32, "not open here")
        await refused("ckpt-commit", b"0" * 65, "up to 64 B")
        await server.stream(site, "files", "ckpt-open", msgspec.json.encode(manifest))
        await refused("ckpt-commit", manifest.id.encode(), "lacks")

        async def stream(source: Any, match: str, **kw: Any) -> None:
            headers = {"id": manifest.id, "path": "config.json", **kw.pop("headers", {})}
            with pytest.raises(BadRequest, match=match):
                await server.stream(site, "files", "ckpt-file", source, headers=headers, **kw)

        data = (hf / "config.json").read_bytes()
        await stream(data, "not a file of", headers={"path": "other.json"})
        await stream(data, "not open here", headers={"id": "0" * 32})
        await stream(data, "announced in bytes", codec="q8")
        # the right bytes, without the SHA-256 the manifest announced: not taken
        await stream(data, "must arrive with its SHA-256")
        # the announced SHA-256 only claimed, not computed here: not taken either
        await stream(data, "must arrive with its SHA-256", digest=False)
        # other bytes claiming the announced SHA-256: the stream's own check fails them
        with pytest.raises(StreamCorrupted):
            await server.stream(
                site,
                "files",
                "ckpt-file",
                data[:-1] + b" ",
                sha256=f"sha256:{config.sha256}",
                headers={"id": manifest.id, "path": "config.json"},
            )
        staging = tmp_path / site / f".incoming-ckpt-{manifest.id}"
        # the staging folder and its manifest beside it, and nothing was put in place
        assert sorted(p.name for p in (tmp_path / site).iterdir()) == [
            staging.name,
            f"{staging.name}.json",
        ]
        assert list(staging.iterdir()) == []


def layout_file(folder: Path, tensors: dict[str, np.ndarray]) -> tuple[Path, bytes]:
    path = folder / "t.safetensors"
    parts = encode(tensors, {"format": "pt"})
    with path.open("wb") as f:
        f.writelines(parts)
    return path, bytes(parts[0])


@pytest.mark.parametrize("codec", ["q8", "nf4", "bf16", "fp16"])
def test_records_cross_slices_and_keep_every_dtype(
    tmp_path: Path, codec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ml_dtypes  # noqa: PLC0415

    monkeypatch.setattr(_quantized, "SENT", 4096)  # slices within and across tensors
    rng = np.random.default_rng(3)
    tensors = {
        "w": rng.normal(size=(100, 123)).astype(ml_dtypes.bfloat16),  # 4 slices, the last of 12
        "f": rng.normal(size=5000).astype(np.float32),
        "d": rng.normal(size=4096).astype(np.float64),  # exactly one slice
        "i": np.arange(9000, dtype=np.int64),  # integers pass unchanged
        "small": np.ones(10, np.float16),
        "empty": np.zeros((0, 4), np.float32),
    }
    src, header = layout_file(tmp_path, tensors)
    out = tmp_path / "out.safetensors"
    writer = ShardWriter(out, header, codec)
    count = 0
    for parts, _ in records(src, header, codec):
        for part in parts:
            for i in range(0, len(bytes(part)), 999):  # fed in pieces that cut records
                writer.feed(bytes(part)[i : i + 999])
        count += 1
    writer.finish(durable=False)
    assert count == 4 + 2 + 1 + 3 + 1
    got = dict(scan_safetensors(out))
    assert got["i"].tolist() == tensors["i"].tolist()
    assert got["small"].tolist() == tensors["small"].tolist()
    assert got["empty"].shape == (0, 4)
    for name in ("w", "f", "d"):
        a, b = got[name].astype(np.float64), tensors[name].astype(np.float64)
        assert got[name].dtype == tensors[name].dtype
        assert np.abs(a - b).max() <= 0.31 * np.abs(b).max()
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9
    assert out.stat().st_size == src.stat().st_size


def scan_safetensors(path: Path) -> dict[str, np.ndarray]:
    import ml_dtypes  # noqa: PLC0415
    from safetensors.numpy import load_file  # noqa: PLC0415  (the reference reader)

    raw = path.read_bytes()
    from flare_async.codecs import decode  # noqa: PLC0415

    tensors, _ = decode(raw)
    ref = load_file(path) if all(t.dtype != ml_dtypes.bfloat16 for t in tensors.values()) else {}
    for name, value in ref.items():
        assert np.array_equal(value, tensors[name])
    return tensors


def test_a_writer_refuses_records_out_of_order_or_of_unknown_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    src, header = layout_file(tmp_path, {"w": rng.normal(size=9000).astype(np.float32)})
    (first,) = [parts for parts, _ in records(src, header, "q8")]
    blob = b"".join(bytes(p) for p in first)

    writers: list[ShardWriter] = []

    def feed(data: bytes) -> ShardWriter:
        writers.append(w := ShardWriter(tmp_path / "o", header, "q8"))
        w.feed(data)
        return w

    feed(blob).finish(durable=False)  # the record as made: taken
    head = msgspec.json.decode(blob[4 : 4 + int.from_bytes(blob[:4], "little")])
    for change, match in (
        ({"tensor": "x"}, "does not name"),
        ({"start": 1}, "out of order"),
        ({"count": 9001}, "out of order"),
        ({"size": 1 << 40}, "at most"),
    ):
        bad = msgspec.json.encode({**head, **change})
        body = blob[4 + int.from_bytes(blob[:4], "little") :]
        with pytest.raises(DecodeError, match=match):
            feed(len(bad).to_bytes(4, "little") + bad + body)
    monkeypatch.setattr(_quantized, "SLICE", 4096)  # a record of more values than a slice
    with pytest.raises(DecodeError, match="a record of 9000 values"):
        feed(blob)
    monkeypatch.undo()
    with pytest.raises(DecodeError, match="at most"):
        feed((1 << 20).to_bytes(4, "little"))
    with pytest.raises(DecodeError, match="not sent whole"):
        feed(b"").finish(durable=False)
    with pytest.raises(DecodeError, match="after the last whole record"):
        feed(blob + b"\x01").finish(durable=False)
    other = encode({"v": np.zeros(9000, np.float64)})  # a slice of another dtype
    size = sum(len(bytes(p)) for p in other)
    h = msgspec.json.encode({**head, "size": size})
    with pytest.raises(DecodeError, match="not 9000"):
        feed(len(h).to_bytes(4, "little") + h + b"".join(bytes(p) for p in other))
    for w in writers:
        w.close()


def test_scan_refuses_what_cannot_be_sent(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a folder"):
        scan(tmp_path / "none")
    with pytest.raises(ConfigError, match="no files"):
        scan(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)
    fp8 = b'{"w":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}}'
    (tmp_path / "fp8.safetensors").write_bytes(len(fp8).to_bytes(8, "little") + fp8 + b"\x01\x02")
    # what the codecs cannot read travels byte for byte, quantized or not
    assert [(f.path, f.quant) for f in scan(tmp_path, quantize="q8").files] == [
        ("fp8.safetensors", ""),
        ("model.safetensors", ""),
    ]
    (tmp_path / "fp8.safetensors").unlink()
    with pytest.raises(ConfigError, match="quantize is one of"):
        scan(tmp_path, quantize="int3")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x").write_text("hidden")
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "loop").symlink_to(tmp_path, target_is_directory=True)  # a symlink loop
    m = scan(tmp_path)
    assert [f.path for f in m.files] == ["a.txt"]  # hidden folders and files stay home
    assert m.files[0].sha256 == hashlib.sha256(b"a").hexdigest()


def test_a_manifest_id_names_its_content() -> None:
    a = Manifest("m", (entry("a"),))
    assert a.id == Manifest("m", (entry("a"),), overwrite=True).id
    assert a.id != Manifest("m", (entry("a", sha256="1" * 64),)).id
    assert a.id != Manifest("n", (entry("a"),)).id


async def test_many_files_arrive_under_concurrent_senders(tmp_path: Path) -> None:
    """Two senders of one folder at once: both stored once, neither corrupts the other."""
    folder = tmp_path / "src" / "ck"
    (folder / "sub").mkdir(parents=True)
    for i in range(8):
        (folder / "sub" / f"f{i}.bin").write_bytes(bytes([i]) * (100_000 + i))
    async with tree(tmp_path) as server:
        results: list[dict[str, Any]] = []

        async def one(name: str) -> None:
            results.append(await send_checkpoint(server, folder, SITES, name=name))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "a")
            tg.start_soon(one, "b")
    assert all(isinstance(o, StoredCheckpoint) for r in results for o in r.values())
    for site in SITES:
        for name in ("a", "b"):
            assert digests(tmp_path / site / name) == digests(folder)


async def test_concurrent_commits_of_one_checkpoint_never_lose_the_folder(
    hf: Path, tmp_path: Path
) -> None:
    """Two sends of one folder with overwrite at once: both open the same staging, one commits
    it, the other is told it is not open any more, and the folder is in place, whole."""
    async with tree(tmp_path) as server:
        assert isinstance((await send_checkpoint(server, hf, SITES[0]))[SITES[0]], StoredCheckpoint)
        outs: list[Any] = []

        async def again() -> None:
            outs.append((await send_checkpoint(server, hf, SITES[0], overwrite=True))[SITES[0]])

        async with anyio.create_task_group() as tg:
            tg.start_soon(again)
            tg.start_soon(again)
    assert any(isinstance(o, StoredCheckpoint) and o.replaced for o in outs), outs
    assert all(isinstance(o, StoredCheckpoint | BadRequest) for o in outs), outs
    assert digests(tmp_path / SITES[0] / "tiny-llama") == digests(hf)
    # beside it at most the loser's hidden staging (kept for a resume), never an old copy
    names = sorted(p.name for p in (tmp_path / SITES[0]).iterdir())
    assert [n for n in names if not n.startswith(".incoming-ckpt-")] == ["tiny-llama"]
    assert not [n for n in names if n.startswith(".incoming-ckpt-old-")]


async def test_a_receiver_naming_another_checkpoint_id_fails_that_destination(
    hf: Path, tmp_path: Path
) -> None:
    from flare_async import Context, HandlerTable, IncomingStream  # noqa: PLC0415

    table = HandlerTable()

    @table.stream("files", "ckpt-open")
    async def other(ctx: Context, stream: IncomingStream) -> bytes:
        await stream.read_all()
        return msgspec.json.encode(Opened("0" * 32, ()))

    net = MemoryNetwork()
    async with (
        Cell("server", listen=["memory://s"], drivers=[net]) as server,
        Cell("server.x", parent="memory://s", drivers=[net], handlers=[table]) as x,
    ):
        await x.wait_parent()
        out = await send_checkpoint(server, hf, "server.x")
    assert isinstance(out["server.x"], DecodeError)
    assert "names the checkpoint '000" in str(out["server.x"])


async def test_a_quantized_file_needs_a_cryptographic_digest(hf: Path, tmp_path: Path) -> None:
    manifest = scan(hf, quantize="q8")
    shard = next(f for f in manifest.files if f.quant)
    body = b"".join(
        bytes(p) for parts, _ in records(hf / shard.path, shard.header, "q8") for p in parts
    )
    headers = {"id": manifest.id, "path": shard.path}
    async with tree(tmp_path) as server:
        await server.stream(SITES[0], "files", "ckpt-open", msgspec.json.encode(manifest))
        with pytest.raises(BadRequest, match="BLAKE3 or SHA-256 digest this cell computes"):
            await server.stream(SITES[0], "files", "ckpt-file", body, codec="q8", headers=headers)
        reply = await server.stream(
            SITES[0], "files", "ckpt-file", body, codec="q8", headers=headers, digest="blake3"
        )
    assert msgspec.json.decode(reply.tobytes())["path"] == shard.path


def test_the_edges_of_a_manifest_s_ranges() -> None:
    """Each limit at its edge: taken, and one past it refused."""
    name = "x" * 255
    assert check_path(name) == name  # a part of 255 bytes
    assert check_path("\u00e9" * 127 + "x") == "\u00e9" * 127 + "x"  # 255 bytes of UTF-8
    deep = "/".join(["y" * 255] * 3 + ["y" * 254, "z"])  # 1,024 bytes
    assert len(deep.encode()) == 1024
    assert check_path(deep) == deep
    with pytest.raises(BadRequest):
        check_path(deep + "z")  # 1,025
    files = tuple(entry(f"f{i}") for i in range(10_000))
    assert check_manifest(Manifest("m", files)) is not None  # 10,000 files
    with pytest.raises(BadRequest, match="1 to 10000 files"):
        check_manifest(Manifest("m", (*files, entry("g"))))
    assert check_manifest(Manifest("m", (entry("a", size=1 << 40),))) is not None  # 1 TiB
    assert check_manifest(Manifest("m", (entry("a", size=0),))) is not None  # empty file


def test_a_commit_whose_rename_fails_puts_the_folder_there_back(tmp_path: Path) -> None:
    """The replacing commit moves the folder there aside first; if the staging folder cannot
    take its place (gone: a commit of the same id got there first), the old one is put back,
    nothing is lost, and nothing hidden is left beside it."""
    from flare_async.checkpoints._receive import _commit  # noqa: PLC0415

    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "config.json").write_text("the stored one")
    manifest = Manifest("ckpt", (entry("config.json"),), overwrite=True)
    with pytest.raises(FileNotFoundError):
        _commit(tmp_path / ".incoming-ckpt-gone", final, manifest, False)
    assert (final / "config.json").read_text() == "the stored one"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    staging = tmp_path / ".incoming-ckpt-new"
    staging.mkdir()
    (staging / "config.json").write_text("the new one")
    (staging / "stray.part").write_text("left by a crash")
    assert _commit(staging, final, manifest, True) is True  # replaced, synced
    assert [p.name for p in final.iterdir()] == ["config.json"]
    assert (final / "config.json").read_text() == "the new one"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    with pytest.raises(FileExistsError):  # without overwrite: refused, untouched
        _commit(staging, final, Manifest("ckpt", (entry("config.json"),)), False)
