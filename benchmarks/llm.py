"""LLM checkpoints between processes (issue 23, "Must show"): (a) a 1B-parameter checkpoint
sent through a relay to 4 sites; (b) one round of federated LoRA against one of full
fine-tuning (``_llm_rounds.py``).

Part (a). The checkpoint is TinyLlama-1.1B's layout with random weights (vocab 32000, hidden
2048, intermediate 5632, 22 layers, 32 heads, 4 kv heads: 1,100,048,384 parameters,
2,200,119,296 B of bf16 tensors), written as Hugging Face shards it
(``model-0000k-of-00005.safetensors`` of at most 500 MB, ``model.safetensors.index.json``,
``config.json``, ``generation_config.json``). It is made in this process without torch or
transformers: each shard's header is ``flare_async.codecs.encode``'s (of unbacked
``np.empty`` arrays of the right shapes), each tensor's bytes are a 2 MiB block of random
normal values (std 0.02, float32 cast to bf16 with ml_dtypes: finite) tiled from an offset of
its own, hashed (SHA-256) as they are written. ``--quick``: the same layout scaled down (vocab
8000, hidden 1024, intermediate 2816, 4 layers, 16 heads; 61,493,248 parameters, 123 MB, shards
of at most 32 MB). Made once per invocation in a temporary folder under ``/tmp`` (removed at
the end), or kept in ``--keep DIR`` and reused from there.

Six processes over tcp on loopback: the sender ``server`` (``_llm_transfer.py``), one relay
``server.r`` (``_streambench.py``'s), four sites ``server.r.s0..3`` each taking checkpoints
into an inbox under ``/tmp`` (``checkpoint_handlers``, fsync'd as a site does). Each file
streams once to the relay, which forwards it to the four sites (``Cell.stream_many``). Cases
``ckpt-<size>-relay4-<wire>``: ``bf16`` (the checkpoint as it is, byte for byte, each file with
its SHA-256), ``q8`` and ``nf4`` (``send_checkpoint(quantize=...)``: the shards quantized per
tensor slice on the wire, written back as bf16 in their layout). Per case, ``--repeat`` runs
(median reported); before each run one raw-socket transfer of the checkpoint's size and one
through the raw relay (stream.py's ``Baseline``: blocking sockets, the relay splicing), and the
sites' floor: 4 processes at once writing the checkpoint's size to a file in 1 MiB writes,
hashing it (SHA-256) and syncing it, with no network at all (what every site must do here, on
the same 2 cores and the same disk).

Lines (every one carries ``load_start`` and ``load_end``: the 1-minute load average when the
case started and when it ended, this benchmark's own processes included):

- ``case`` ``throughput`` (B/s): checkpoint bytes / seconds from the start of
  ``send_checkpoint`` to its return (its ``scan`` of the folder, SHA-256 of every file,
  included; every site has committed its folder), ``baseline``: the raw socket, with
  ``baseline_relay``/``ratio_relay``: the raw relay, ``baseline_sites``/``ratio_sites``: the
  sites' floor (the fair ceiling of this case); ``verified``: ``pass`` if every site's
  folder matched in every run (lossless: the SHA-256 of every file, computed in the site's
  process; quantized: the same file list and sizes, the SHA-256 of the files not quantized).
- ``case`` ``seconds`` (s) of the send; ``case:scan`` ``seconds``: ``scan`` alone (the source's
  hashing), timed just before each send.
- ``case`` ``wire_bytes`` (B): bytes the sender put on its link per run, ``baseline`` the
  checkpoint's size (``ratio``: the fraction that travels; 1.0 for bf16 means once, not once
  per site).
- ``case:raw-relay`` ``throughput`` against the raw socket (as ``stream.py`` reports it), and
  ``case:sites-write`` ``throughput``: the sites' floor.
- ``case:sender``, ``case:relay``, ``case:sites`` ``cpu_seconds`` (s, user + system) per run,
  beside the run's ``wall_seconds``: the sender's during the send (the scan included), the
  relay's since it linked divided by the runs, the four sites' together from the end of one
  check to the start of the next (the transfer). Two cores: their sum over 2 is the least
  wall time the run could take.
- ``case:sender``, ``case:relay``, ``case:site`` (the largest of the four) ``peak_rss`` (B),
  with ``target`` (256 MiB, the issue's bound whatever the size) and ``met``.

Part (b): the records of ``_llm_rounds.lora_vs_full(quick)``, as they are (its docstring says
what they are), imported only when part (b) runs.

Run: ``python benchmarks/llm.py [--quick] [--repeat N] [--cases bf16,q8,nf4] [--part a|b|all]
[--keep DIR] [--window BYTES] [--no-fsync]``. Full size: 2.2 GB, 3 runs a case (about 8
minutes); ``--quick``: 123 MB, 1 run (about 25 s for part (a), 12 s for part (b)).
``--no-fsync``: the sites take files without fsync (cases ``...-nofsync``), to see what it
costs.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from _report import csv_choice, emit, line, log, median, parser
from stream import Baseline, Child, parse_size

from flare_async.codecs import encode

BENCH = "llm"
TRANSFER = str(Path(__file__).with_name("_llm_transfer.py"))
STREAMBENCH = str(Path(__file__).with_name("_streambench.py"))
SITES = 4
WIRE = {"bf16": "", "q8": "q8", "nf4": "nf4"}
"""Case suffix -> ``send_checkpoint(quantize=)``."""
RSS_TARGET = 256 << 20
MARKER = ".llm-bench.json"
"""In the checkpoint folder (hidden: ``scan`` leaves it out): the layout and every file's size
and SHA-256, as written."""
_BLOCK_VALUES = 1 << 20


@dataclass(frozen=True)
class Layout:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    shard_bytes: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """A Llama's state dict, in its order: name and shape."""
        h, kv = self.hidden, self.hidden // self.heads * self.kv_heads
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (self.intermediate, h)),
                (p + "mlp.up_proj.weight", (self.intermediate, h)),
                (p + "mlp.down_proj.weight", (h, self.intermediate)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        return [*out, ("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]

    def shards(self) -> list[list[tuple[str, tuple[int, ...]]]]:
        """The tensors cut into shards of at most ``shard_bytes`` (as ``save_pretrained``'s
        ``max_shard_size``: a new shard when the next tensor would not fit)."""
        shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
        size = 0
        for name, shape in self.tensors():
            n = 2 * int(np.prod(shape))
            if shards[-1] and size + n > self.shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, shape))
            size += n
        return shards

    def config(self) -> dict[str, Any]:
        """``config.json`` as transformers writes a Llama's."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate,
            "max_position_embeddings": 2048,
            "model_type": "llama",
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.kv_heads,
            "rms_norm_eps": 1e-05,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "vocab_size": self.vocab,
        }


FULL = Layout(32000, 2048, 5632, 22, 32, 4, 500_000_000)  # TinyLlama-1.1B
QUICK = Layout(8000, 1024, 2816, 4, 16, 4, 32_000_000)


def size_tag(size: int) -> str:
    return f"{size / 1e9:.1f}GB" if size >= 1e9 else f"{round(size / 1e6)}MB"


def write_checkpoint(folder: Path, layout: Layout) -> dict[str, Any]:
    """Write the checkpoint (see the module's docstring) into the empty ``folder``; return
    what :data:`MARKER` keeps: ``{"layout", "files": {path: [size, sha256]}, "size"}``."""
    rng = np.random.default_rng(23)
    block = (rng.standard_normal(_BLOCK_VALUES, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    assert np.isfinite(block.astype(np.float32)).all()
    raw = memoryview(block.view(np.uint8))
    files: dict[str, list[Any]] = {}

    def put(rel: str, parts: list[Any]) -> None:
        h, n = hashlib.sha256(), 0
        with (folder / rel).open("wb") as f:
            for part in parts:
                h.update(part)
                n += f.write(part)
        files[rel] = [n, h.hexdigest()]

    def tiled(nbytes: int, index: int) -> Any:
        offset = (index * 7919 * 2) % raw.nbytes  # another start per tensor, 2-byte aligned
        while nbytes > 0:
            piece = raw[offset : offset + nbytes]
            yield piece
            nbytes -= piece.nbytes
            offset = 0

    shards = layout.shards()
    weight_map: dict[str, str] = {}
    total, index = 0, 0
    for k, shard in enumerate(shards, 1):
        rel = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        # encode() of arrays never touched: the header, with no memory behind the tensors.
        header = encode(
            {name: np.empty(shape, ml_dtypes.bfloat16) for name, shape in shard},
            {"format": "pt"},
        )[0]
        data = []
        for name, shape in shard:
            nbytes = 2 * int(np.prod(shape))
            data.append(tiled(nbytes, index))
            weight_map[name] = rel
            total += nbytes
            index += 1
        put(rel, [header, *(p for gen in data for p in gen)])
    index_json = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    put("model.safetensors.index.json", [json.dumps(index_json, indent=2).encode()])
    put("config.json", [json.dumps(layout.config(), indent=2).encode()])
    generation = {"bos_token_id": 1, "eos_token_id": 2, "max_length": 2048}
    put("generation_config.json", [json.dumps(generation, indent=2).encode()])
    marker = {
        "layout": asdict(layout),
        "files": dict(sorted(files.items())),
        "size": sum(v[0] for v in files.values()),
    }
    (folder / MARKER).write_text(json.dumps(marker, indent=1))
    return marker


def checkpoint(folder: Path, layout: Layout) -> dict[str, Any]:
    """The checkpoint in ``folder``: reused if its marker says it has ``layout``, else
    written (``folder`` must then be empty or absent)."""
    marker = folder / MARKER
    if marker.is_file():
        kept = json.loads(marker.read_text())
        if kept["layout"] == asdict(layout):
            log(f"reusing the checkpoint in {folder} ({kept['size'] / 1e9:.2f} GB)")
            return dict(kept)
        raise SystemExit(f"{folder} holds a checkpoint of another layout; use another --keep")
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise SystemExit(f"{folder} is not empty and holds no benchmark checkpoint")
    start = time.perf_counter()
    made = write_checkpoint(folder, layout)
    log(
        f"wrote {len(made['files'])} files, {made['size'] / 1e9:.2f} GB, in {folder}"
        f" in {time.perf_counter() - start:.1f} s"
    )
    return made


def load() -> float:
    return round(os.getloadavg()[0], 2)


def _write_like_a_site(path: str, size: int, durable: bool) -> None:
    """What a site does with the checkpoint's bytes at the least: 1 MiB writes to a file, each
    hashed (SHA-256), synced at the end (``durable``)."""
    block = np.random.default_rng(3).bytes(1 << 20)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left > 0:
            piece = block[: min(left, len(block))]
            f.write(piece)
            digest.update(piece)
            left -= len(piece)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.unlink(path)


def sites_write(size: int, tmp: Path, durable: bool) -> float:
    """The sites' floor, B/s of checkpoint: ``SITES`` processes at once, each writing and
    hashing the checkpoint's size as :func:`_write_like_a_site` (no network, no framing)."""
    procs = [
        multiprocessing.Process(
            target=_write_like_a_site, args=(str(tmp / f"floor-{i}.bin"), size, durable)
        )
        for i in range(SITES)
    ]
    start = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return size / (time.perf_counter() - start)


def run_case(
    case: str,
    quantize: str,
    folder: Path,
    made: dict[str, Any],
    repeat: int,
    base: Baseline,
    tmp: Path,
    window: int,
    durable: bool,
) -> None:
    size = made["size"]
    load_start = load()
    sites = [f"server.r.s{i}" for i in range(SITES)]
    with ExitStack() as stack:
        sender = Child(
            {
                "role": "sender",
                "folder": str(folder),
                "expected": str(folder / MARKER),
                "sites": sites,
                "quantize": quantize,
                "window": window,
            },
            TRANSFER,
        )
        stack.callback(sender.kill)
        port = sender.line()["port"]
        relay = Child({"role": "relay", "name": "server.r", "parent": f"tcp://127.0.0.1:{port}"})
        stack.callback(relay.kill)
        parent = f"tcp://127.0.0.1:{relay.line()['port']}"
        members = []
        for i, name in enumerate(sites):
            inbox = tmp / f"inbox-{i}"
            cfg = {
                "role": "site",
                "name": name,
                "parent": parent,
                "inbox": str(inbox),
                "durable": durable,
            }
            members.append(Child(cfg, TRANSFER))
            stack.callback(members[-1].kill)
        for c in members:
            c.line()  # ready
        sender.line()  # every site answers
        runs, bases, relay_bases, floors = [], [], [], []
        for i in range(repeat):
            bases.append(base.once())
            relay_bases.append(base.once_relayed())
            floors.append(sites_write(size, tmp, durable))
            assert sender.proc.stdin is not None
            sender.proc.stdin.write(f"go {case}-{i}\n")
            sender.proc.stdin.flush()
            rec = sender.line()
            if "error" in rec:
                raise RuntimeError(f"{case} run {i + 1}: {rec['error']}")
            runs.append(rec)
            log(
                f"{case} run {i + 1}/{repeat}: {size / rec['seconds'] / 1e9:.3f} GB/s,"
                f" {rec['seconds']:.1f} s (scan alone {rec['scan_seconds']:.1f} s),"
                f" {rec['sent'] / 1e6:.0f} MB on the sender's link;"
                f" raw socket just before: {bases[-1] / 1e9:.2f} GB/s,"
                f" raw relay: {relay_bases[-1] / 1e9:.2f}, {SITES} sites writing:"
                f" {floors[-1] / 1e9:.2f}; verified: {rec['verified']}"
                f" ({next(iter(rec['details'].values()))})"
            )
            if not rec["verified"]:
                log(f"{case} run {i + 1}: VERIFICATION FAILED: {rec['details']}")
        rss: dict[str, int] = {}
        relay_cpu = 0.0
        for group in (members, [relay]):  # the sites first: no cell outlives its parent
            for c in group:
                c.stop()
            for c in group:
                rec = c.line()
                rss[c.role] = max(rss.get(c.role, 0), rec["peak_rss"])
                relay_cpu += rec.get("cpu_seconds", 0.0) if c.role == "relay" else 0.0
        sender.stop()
        rss = {"sender": sender.line()["peak_rss"], **rss}
    loads = {"load_start": load_start, "load_end": load()}
    base_med, relay_med, floor_med = median(bases), median(relay_bases), median(floors)
    value = median([size / r["seconds"] for r in runs])
    verified = all(r["verified"] for r in runs)
    emit(
        BENCH,
        case,
        "throughput",
        value,
        "B/s",
        base_med,
        baseline_relay=float(f"{relay_med:.6g}"),
        ratio_relay=round(value / relay_med, 4),
        baseline_sites=float(f"{floor_med:.6g}"),
        ratio_sites=round(value / floor_med, 4),
        verified="pass" if verified else "fail",
        check="sha256 per file" if not quantize else "file list and sizes",
        runs=len(runs),
        **loads,
    )
    emit(BENCH, case, "seconds", median([r["seconds"] for r in runs]), "s", **loads)
    emit(BENCH, f"{case}:scan", "seconds", median([r["scan_seconds"] for r in runs]), "s", **loads)
    emit(BENCH, case, "wire_bytes", median([r["sent"] for r in runs]), "B", size, **loads)
    emit(BENCH, f"{case}:raw-relay", "throughput", relay_med, "B/s", base_med, **loads)
    emit(BENCH, f"{case}:sites-write", "throughput", floor_med, "B/s", base_med, **loads)
    wall = median([r["seconds"] for r in runs])
    for role, cpu in (
        ("sender", median([r["cpu"] for r in runs])),
        ("relay", relay_cpu / len(runs)),
        ("sites", median([r["site_cpu"] for r in runs])),
    ):
        emit(BENCH, f"{case}:{role}", "cpu_seconds", cpu, "s", wall_seconds=round(wall, 3), **loads)
    for role, value in rss.items():
        emit(
            BENCH,
            f"{case}:{role}",
            "peak_rss",
            value,
            "B",
            target=RSS_TARGET,
            met=value < RSS_TARGET,
            **loads,
        )


def part_a(args: Any) -> None:
    layout = QUICK if args.quick else FULL
    repeat = args.repeat or (1 if args.quick else 3)
    log(f"load average {os.getloadavg()} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="llm-bench-", dir="/tmp") as tmp, ExitStack() as stack:
        folder = Path(args.keep) if args.keep else Path(tmp) / "tinyllama-random"
        made = checkpoint(folder, layout)
        tag = size_tag(made["size"])
        base = Baseline(made["size"])
        stack.callback(base.close)
        for wire in args.cases:
            case = f"ckpt-{tag}-relay{SITES}-{wire}" + ("" if args.fsync else "-nofsync")
            log(f"{case}: {repeat} runs")
            run_case(
                case, WIRE[wire], folder, made, repeat, base, Path(tmp), args.window, args.fsync
            )
        if not args.keep:
            shutil.rmtree(folder)


# ---------------------------------------------------------------- part (b) hook
def part_b(quick: bool) -> None:
    """Part (b), ``benchmarks/_llm_rounds.py``'s ``lora_vs_full`` (written beside this one):
    its records as they are, each with the load when printed. Nothing if it is not there."""
    try:
        from _llm_rounds import lora_vs_full  # noqa: PLC0415 - heavy (torch), part (b) only
    except ModuleNotFoundError as exc:
        if exc.name != "_llm_rounds":
            raise
        log("part (b): benchmarks/_llm_rounds.py is not there yet; nothing to report")
        return
    for record in lora_vs_full(quick):
        line(**{**record, "load_end": load()})


def main() -> None:
    p = parser(__doc__.split("\n\n", 1)[0])
    p.set_defaults(repeat=None)  # 3, or 1 with --quick
    p.add_argument(
        "--cases",
        type=csv_choice(tuple(WIRE)),
        default=list(WIRE),
        help=f"comma-separated, among {','.join(WIRE)} (default: all)",
    )
    p.add_argument(
        "--part",
        choices=("a", "b", "all"),
        default="all",
        help="a: the checkpoint through a relay; b: LoRA against full fine-tuning (default all)",
    )
    p.add_argument(
        "--keep",
        metavar="DIR",
        default="",
        help="make the checkpoint in DIR and keep it there, or reuse the one already there",
    )
    p.add_argument(
        "--window",
        type=parse_size,
        default=16 << 20,
        help="the streams' window (default 16MiB, the library's)",
    )
    p.add_argument(
        "--no-fsync",
        dest="fsync",
        action="store_false",
        help="sites take files without fsync (checkpoint_handlers(durable=False)); cases get "
        "the suffix -nofsync",
    )
    args = p.parse_args()
    started = time.perf_counter()
    if args.part in ("a", "all"):
        part_a(args)
    if args.part in ("b", "all"):
        part_b(args.quick)
    log(f"done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
