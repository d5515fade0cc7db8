"""Every public face of flare_async, pinned: the exact ``__all__`` of each public module.

A change to any public surface must change this file; that is the point. Before you do, decide
whose face the name belongs on (docs/design.md, "Public faces"):

* **Users**, who run cells and FL jobs: ``flare_async`` (the :class:`Cell` and what it takes and
  returns), ``flare_async.fl`` (FLModel, recipes, workflows, FLServer for workflows of your own,
  the site and relay sides, the simulator), ``flare_async.client`` (the FLARE-shaped Client API
  a training script calls, with ``.lightning`` and ``.tracking``), ``flare_async.errors`` and
  ``flare_async.cli`` (the command line, and cells from startup kits for programs of your own).
* **Driver and codec authors**: ``flare_async.lowlevel`` (the Link/Driver/Listener interfaces,
  frames and the sans-IO framing, the codec protocol and registry, the sans-IO stream ends).
* **People testing drivers and deployments**: ``flare_async.testing`` (the driver conformance
  suite, fault injection, throwaway provisioned projects).
* **The layer packages** (``cell``, ``codecs``, ``streaming``, ``transport``, ``security``,
  ``routing``, ``wire``): each layer's own API, which the layers above import; public for
  operators (``security``: provisioning, kits) and for work below ``lowlevel``'s selection.

Plumbing that only the package itself uses stays in the private modules and out of every
``__all__`` here (``flare_async.fl._model.model_parts``, ``flare_async.fl._recipe.load_recipe``...).
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

import pytest

import flare_async

PINNED: dict[str, list[str]] = {
    # users
    "flare_async": [
        "Backoff",
        "BroadcastResults",
        "Cell",
        "CellName",
        "CellStatistics",
        "Context",
        "Driver",
        "HandlerTable",
        "IncomingStream",
        "Limits",
        "Link",
        "Listener",
        "MemoryNetwork",
        "Outcome",
        "Payload",
        "Progress",
        "__version__",
        "errors",
        "system_handlers",
    ],
    "flare_async.fl": [
        "AdminRights",
        "ClientRuntime",
        "CyclicRecipe",
        "DITTO_LAMBDA",
        "Ditto",
        "EdgeClient",
        "EdgeStats",
        "FEDPROX_MU",
        "FLModel",
        "FLServer",
        "FedAvg",
        "FedAvgRecipe",
        "FedBuffStats",
        "FedOpt",
        "FedProx",
        "JOB_CHANNEL",
        "JobCode",
        "JobManager",
        "NotEnoughUpdates",
        "ParamsType",
        "RelayAggregator",
        "Robust",
        "RobustAggregation",
        "RoundFailed",
        "RoundMismatch",
        "RoundResult",
        "SCAFFOLD_CONTROL",
        "SCAFFOLD_CTRL_DIFF",
        "SCAFFOLD_CTRL_GLOBAL",
        "Scaffold",
        "SecAggError",
        "SecAggRangeError",
        "SecureAggregation",
        "ServerOptimizer",
        "SiteJobs",
        "SitePolicy",
        "SwarmRecipe",
        "WeightedSum",
        "cross_site_eval",
        "cyclic",
        "fedavg",
        "fedavg_step",
        "fedbuff",
        "is_own_code",
        "load_policy",
        "pack_job",
        "render_matrix",
        "secure_round",
        "simulate",
        "swarm",
    ],
    "flare_async.client": [
        "AnalyticsDataType",
        "FLModel",
        "ParamsType",
        "clear",
        "get_config",
        "get_job_id",
        "get_site_name",
        "get_task_name",
        "init",
        "is_evaluate",
        "is_running",
        "is_submit_model",
        "is_train",
        "log",
        "receive",
        "receive_async",
        "send",
        "send_async",
        "system_info",
    ],
    "flare_async.client.lightning": [
        "AnalyticsDataType",
        "FLCallback",
        "FLModel",
        "ParamsType",
        "clear",
        "get_config",
        "get_job_id",
        "get_site_name",
        "get_task_name",
        "init",
        "is_evaluate",
        "is_running",
        "is_submit_model",
        "is_train",
        "log",
        "patch",
        "receive",
        "send",
        "system_info",
    ],
    "flare_async.client.tracking": ["MLflowWriter", "SummaryWriter", "WandBWriter"],
    "flare_async.client.algorithms": [
        "Ditto",
        "FedProxLoss",
        "PTFedProxLoss",
        "Scaffold",
        "fedprox_mu",
        "prox_grad",
        "prox_term",
    ],
    "flare_async.errors": [
        "BadRequest",
        "CellClosed",
        "CodecError",
        "ConfigError",
        "ConnectError",
        "DeadlineExceeded",
        "DecodeError",
        "FlareError",
        "FrameTooLarge",
        "IdentityError",
        "IntegrityError",
        "InternalError",
        "InvalidName",
        "LinkBroken",
        "LinkClosed",
        "NoHandler",
        "Overloaded",
        "ProtocolError",
        "RemoteError",
        "RoutingError",
        "Status",
        "StreamAborted",
        "StreamCorrupted",
        "StreamError",
        "StreamStalled",
        "TransportError",
        "Unauthorized",
        "Unreachable",
        "UnsupportedScheme",
        "VersionMismatch",
        "error_for_status",
        "status_for_error",
    ],
    "flare_async.cli": ["RoleCell", "cell_from_kit", "edge_client_from_kit", "main"],
    # driver and codec authors
    "flare_async.lowlevel": [
        "Ack",
        "Admission",
        "AskResend",
        "Buffer",
        "Codec",
        "CodecRegistry",
        "Committed",
        "Connection",
        "DEFAULT_CHUNK",
        "DEFAULT_WINDOW",
        "Deliver",
        "Driver",
        "DriverRegistry",
        "EOF",
        "EndVerdict",
        "Envelope",
        "Frame",
        "HELLO_BUFFER",
        "HELLO_LIMITS",
        "Limits",
        "Link",
        "LinkFacts",
        "LinkStatistics",
        "Listener",
        "MAX_WINDOW",
        "NEED_DATA",
        "PREFIX_SIZE",
        "Passing",
        "Probe",
        "PushDelivery",
        "ReceiverAction",
        "ReceiverComplete",
        "ReceiverFlow",
        "ReceiverMachine",
        "ReceiverState",
        "Rewind",
        "SendData",
        "SendEnd",
        "SendOpen",
        "SenderAction",
        "SenderBackoff",
        "SenderDone",
        "SenderFlow",
        "SenderMachine",
        "SenderState",
        "Splicing",
        "StreamFail",
        "StreamWait",
        "TensorCodec",
        "Verdict",
        "checksum",
        "decode_frame",
        "default_codecs",
        "encode_head",
        "negotiate",
        "payload_size",
        "pick_chunk",
        "receiver_idle",
        "url_scheme",
    ],
    # testing drivers and deployments
    "flare_async.testing": [
        "BreakLink",
        "CONFORMANCE_CHECKS",
        "Direction",
        "FaultCounters",
        "FaultProxy",
        "FaultyDriver",
        "FramePredicate",
        "FrameRewrite",
        "HeaderMatch",
        "LinkPairFactory",
        "check_cancel_mid_send",
        "check_close_vs_broken",
        "check_deliver_to",
        "check_eof_wakes_receiver",
        "check_frame_too_large",
        "check_large_frames",
        "check_link_conformance",
        "check_ordering",
        "check_try_send",
        "driver_pair",
        "flip_one_byte",
        "free_ports",
        "rst_close",
        "run_check",
        "wss_edge_project",
    ],
    # the layer packages
    "flare_async.cell": [
        "Backoff",
        "BroadcastResults",
        "Cell",
        "CellAPI",
        "CellInfo",
        "CellStatistics",
        "Context",
        "HandlerTable",
        "INLINE_MAX",
        "IncomingStream",
        "InlineStream",
        "Kind",
        "Outcome",
        "Payload",
        "PeerVerifier",
        "StreamSource",
        "StreamStatistics",
        "system_handlers",
    ],
    "flare_async.codecs": [
        "Codec",
        "CodecRegistry",
        "FP4_BOUND",
        "FP4_STOCHASTIC_BOUND",
        "INT8_BOUND",
        "LUT_RESOLUTION",
        "MAX_HEADER",
        "NF4_BOUND",
        "NF4_STOCHASTIC_BOUND",
        "QuantCodec",
        "TensorCodec",
        "as_numpy",
        "decode",
        "default_codecs",
        "dequantize",
        "dtype_name",
        "dtype_named",
        "encode",
        "tensor_layout",
        "to_torch",
    ],
    "flare_async.checkpoints": [
        "FileEntry",
        "Manifest",
        "Opened",
        "SCHEMES",
        "StoredCheckpoint",
        "checkpoint_handlers",
        "scan",
        "send_checkpoint",
    ],
    "flare_async.streaming": [
        "Ack",
        "AskResend",
        "BLAKE3",
        "CRC32C",
        "CRYPTOGRAPHIC",
        "Committed",
        "CrcDigest",
        "DEFAULT_CHUNK",
        "DEFAULT_WINDOW",
        "DIGESTS",
        "Deliver",
        "EndVerdict",
        "LARGE_CHUNK",
        "LARGE_FROM",
        "MAX_WINDOW",
        "Probe",
        "Progress",
        "ProgressMeter",
        "ReceiverAction",
        "ReceiverComplete",
        "ReceiverFlow",
        "ReceiverMachine",
        "ReceiverState",
        "Rewind",
        "SHA256",
        "SendData",
        "SendEnd",
        "SendOpen",
        "SenderAction",
        "SenderBackoff",
        "SenderDone",
        "SenderFlow",
        "SenderMachine",
        "SenderState",
        "StreamFail",
        "StreamWait",
        "Verdict",
        "check_algorithm",
        "checksum",
        "crc32c_combine",
        "format_digest",
        "negotiate",
        "normalize_digest",
        "parse_digest",
        "pick_chunk",
        "receiver_idle",
    ],
    "flare_async.transport": [
        "Admission",
        "Driver",
        "DriverRegistry",
        "Link",
        "LinkFacts",
        "LinkStatistics",
        "Listener",
        "MemoryLink",
        "MemoryNetwork",
        "PushDelivery",
        "Splicing",
        "TcpDriver",
        "TcpLink",
        "WebSocketDriver",
        "url_scheme",
    ],
    "flare_async.security": [
        "ADMIN_CELL_PREFIX",
        "ALLOWED_ACTS",
        "AdminSpec",
        "AuditLog",
        "AuditReport",
        "CA_DIR",
        "CertificateAuthority",
        "ClientSpec",
        "DEFAULT_CA_DAYS",
        "DEFAULT_CERT_DAYS",
        "Decryptor",
        "GENESIS",
        "Identity",
        "IssuedCertificate",
        "KIT_FILE",
        "Kit",
        "MESSAGE_MAX_AGE",
        "MessageSigning",
        "Project",
        "RelaySpec",
        "Role",
        "ServerSpec",
        "SignatureVerifier",
        "Signer",
        "add_site",
        "admin_cell_name",
        "check_claim",
        "check_command",
        "client_context",
        "create_ca",
        "encrypt_for",
        "identity_from_certificate",
        "issue_certificate",
        "load_ca",
        "load_kit",
        "load_project",
        "message_fields",
        "payload_digest",
        "peer_identity",
        "provision",
        "server_context",
        "validate_participant_name",
        "verify_audit",
        "write_certificate",
        "write_private_key",
    ],
    "flare_async.routing": [
        "CellName",
        "LOCAL",
        "MAX_DEPTH",
        "MAX_PART",
        "PARENT",
        "check_route",
        "next_hop",
        "validate_name",
    ],
    "flare_async.wire": [
        "Buffer",
        "Bye",
        "Connection",
        "ConnectionStatistics",
        "EOF",
        "Envelope",
        "Error",
        "Event",
        "Frame",
        "HELLO_BUFFER",
        "HELLO_LIMITS",
        "Hello",
        "Limits",
        "MAGIC",
        "MIN_PROTOCOL_VERSION",
        "NEED_DATA",
        "PASS_FROM",
        "PREFIX",
        "PREFIX_SIZE",
        "PROTOCOL_VERSION",
        "Passing",
        "Ping",
        "Pong",
        "ROUTED_KINDS",
        "Reply",
        "Request",
        "Role",
        "Routed",
        "STREAM_KINDS",
        "Session",
        "StreamAbort",
        "StreamAck",
        "StreamData",
        "StreamDone",
        "StreamEnd",
        "StreamMessage",
        "StreamOpen",
        "WIRE_VERSION",
        "check_hello",
        "decode_frame",
        "decode_header",
        "encode_head",
        "encode_header",
        "make_hello",
        "originate",
        "parse_prefix",
        "payload_size",
    ],
}

PROGRAMS = {"flare_async.fl.job_process", "flare_async.fl.worker"}
"""Public modules that are programs (``python -m ...``), not faces: they have no ``__all__``."""

LOWLEVEL_SOURCES = ("transport", "wire", "codecs", "streaming")
"""The layer packages ``flare_async.lowlevel`` selects from."""


def public_modules() -> set[str]:
    """``flare_async`` and every module below it with no part of its name private."""
    found = {"flare_async"}
    for info in pkgutil.walk_packages(flare_async.__path__, "flare_async."):
        if not any(part.startswith("_") for part in info.name.split(".")[1:]):
            found.add(info.name)
    return found


def face(name: str) -> tuple[ModuleType, list[str]]:
    module = importlib.import_module(name)
    return module, list(module.__all__)


def test_every_public_module_is_pinned_or_a_program() -> None:
    assert public_modules() == set(PINNED) | PROGRAMS


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_programs_have_no_face(name: str) -> None:
    assert not hasattr(importlib.import_module(name), "__all__")


@pytest.mark.parametrize("name", sorted(PINNED))
def test_all_is_pinned(name: str) -> None:
    _, names = face(name)
    assert len(names) == len(set(names)), f"{name}.__all__ names something twice"
    assert sorted(names) == PINNED[name]


@pytest.mark.parametrize("name", sorted(PINNED))
def test_every_exported_name_exists(name: str) -> None:
    module, names = face(name)
    missing = [n for n in names if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it does not have: {missing}"


@pytest.mark.parametrize("name", sorted(PINNED))
def test_no_private_name_is_exported(name: str) -> None:
    """No ``_name`` in a face (a dunder such as ``__version__`` is not private)."""
    _, names = face(name)
    private = [
        n for n in names if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))
    ]
    assert not private, f"{name}.__all__ exports private names: {private}"


def test_lowlevel_only_re_exports_the_layers() -> None:
    """``flare_async.lowlevel`` is a selection, not a second home: each of its names is the very
    object a layer package exports under that name."""
    module, names = face("flare_async.lowlevel")
    layers = [importlib.import_module(f"flare_async.{source}") for source in LOWLEVEL_SOURCES]
    for n in names:
        homes = [layer for layer in layers if n in layer.__all__]
        assert homes, f"lowlevel.{n} is exported by no layer package"
        assert all(getattr(home, n) is getattr(module, n) for home in homes), n


def test_plumbing_is_off_the_fl_face() -> None:
    fl = importlib.import_module("flare_async.fl")
    for n in ("model_parts", "model_from_parts", "script_spec", "load_recipe", "staleness_weight"):
        assert not hasattr(fl, n), n
