"""The Client API as FLARE scripts use it: the loop's end, the task's name, the system info,
params in the script's framework, tracked values reaching the server, and a script that fails
before its first task."""

from __future__ import annotations

import json
import math
import threading
from typing import Any

import anyio
import numpy as np
import pytest
import torch

import flare_async.client as flare
import flare_async.fl._server as server_module
from flare_async.cell import Cell, Payload
from flare_async.client.tracking import MLflowWriter, SummaryWriter, WandBWriter
from flare_async.codecs import CodecRegistry, decode
from flare_async.errors import BadRequest, Unauthorized
from flare_async.fl import FLModel, FLServer, ParamsType, RoundFailed, fedavg, simulate
from flare_async.fl._client import ClientRuntime, _Task
from flare_async.fl._model import model_parts, to_framework
from flare_async.fl._tracking import MAX_KEY, MetricsBuffer, check_batch, records
from flare_async.transport import MemoryNetwork

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # scripts run in worker threads: real clocks


def plus_one(model: FLModel) -> dict[str, Any]:
    return {k: v + 1 for k, v in model.params.items()}


async def run_fedavg(script: Any, initial: dict[str, Any], *, rounds: int = 2, **kw: Any) -> Any:
    async def wf(server: FLServer) -> FLModel:
        return await fedavg(server, initial, rounds=rounds, deadline=kw.pop("deadline", 60), **kw)

    return await simulate(wf, script, clients=2)


# ------------------------------------------------------------------ the loop and its end
async def test_a_flare_loop_without_a_none_check_ends_cleanly_with_the_job() -> None:
    ended: list[str] = []

    def script() -> None:  # FLARE's loop, as written for FLARE: no None check
        flare.init()
        while flare.is_running():
            model = flare.receive()
            flare.send(flare.FLModel(params=plus_one(model), params_type="FULL", metrics=None))
        ended.append(flare.get_site_name())

    final = await run_fedavg(script, {"w": np.zeros(3)}, rounds=3)
    assert np.allclose(final.params["w"], 3.0)
    assert sorted(ended) == ["server.site-1", "server.site-2"]


async def test_a_send_after_the_job_ended_returns_and_the_loop_ends() -> None:
    net = MemoryNetwork()
    rt = ClientRuntime(Cell("server.site-1", drivers=[net]), "server", job="j")
    rt._put(_Task("t1", FLModel(params={"w": np.zeros(2)}), "server"))
    received, go, done = threading.Event(), threading.Event(), threading.Event()
    seen: list[Any] = []

    def script() -> None:
        try:
            model = flare.receive()
            received.set()
            go.wait()  # the job ends (its portal closes) meanwhile
            flare.send(model)  # raised CancelledError / RuntimeError into the script before
            seen.append(flare.is_running())
        except BaseException as exc:
            seen.append(exc)
        finally:
            done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(rt.run_script, script)
        await anyio.to_thread.run_sync(received.wait)
        tg.cancel_scope.cancel()
    go.set()
    await anyio.to_thread.run_sync(done.wait)
    assert seen == [False]


# ------------------------------------------------------------------ what the script is told
async def test_system_info_and_the_task_name_are_flares() -> None:
    seen: dict[str, Any] = {}

    def script() -> None:
        flare.init()
        while flare.is_running():
            model = flare.receive()
            site = flare.get_site_name()
            seen[site] = (
                flare.system_info(),
                flare.get_job_id(),
                flare.get_task_name(),
                flare.is_train(),
                flare.is_evaluate(),
                flare.is_submit_model(),
            )
            flare.send(flare.FLModel(params=plus_one(model)))

    await run_fedavg(script, {"w": np.zeros(1)}, rounds=1)
    assert seen["server.site-1"] == (
        {"job_id": "sim", "site_name": "server.site-1"},
        "sim",
        "train",
        True,
        False,
        False,
    )


async def test_params_come_back_as_torch_when_the_model_is_torch() -> None:
    types: set[str] = set()
    net = torch.nn.Linear(3, 2)

    def script() -> None:
        local = torch.nn.Linear(3, 2)
        flare.init()
        while flare.is_running():
            model = flare.receive()
            types.update(type(v).__name__ for v in model.params.values())
            local.load_state_dict(model.params)  # failed on numpy arrays before
            with torch.no_grad():
                for param in local.parameters():
                    param.add_(1)
            flare.send(flare.FLModel(params=local.state_dict()))

    final = await run_fedavg(script, dict(net.state_dict()), rounds=2)
    assert types == {"Tensor"}
    assert np.allclose(final.params["bias"], net.bias.detach().numpy() + 2, atol=1e-6)


async def test_torch_models_give_torch_params_and_numpy_models_numpy() -> None:
    kinds: list[tuple[str, bool]] = []

    def script() -> None:
        flare.init()
        while flare.is_running():
            model = flare.receive()
            v = model.params["w"]
            kinds.append((type(v).__name__, getattr(v, "is_contiguous", lambda: False)()))
            flare.send(flare.FLModel(params={"w": np.asarray(v) + 1}))

    await run_fedavg(script, {"w": np.zeros(3, np.float32)}, rounds=1)
    assert {k for k, _ in kinds} == {"ndarray"}
    kinds.clear()
    await run_fedavg(script, {"w": torch.zeros(3)}, rounds=1)
    assert kinds == [("Tensor", True), ("Tensor", True)]


# ------------------------------------------------------------------ tracked values
async def test_logged_and_tracked_values_reach_the_server_per_site_key_and_step() -> None:
    got: list[dict[str, Any]] = []

    def script() -> None:
        flare.init()
        writer, mlflow, wandb = SummaryWriter(), MLflowWriter(), WandBWriter()
        while flare.is_running():
            model = flare.receive()
            r = model.current_round
            flare.log("loss", 1.0 / (r + 1), step=r)
            flare.log("lr", 0.5, flare.AnalyticsDataType.SCALAR, global_step=r)  # FLARE's shape
            writer.add_scalars("acc", {"train": 0.9, "val": 0.8}, global_step=r)
            mlflow.log_metric("nan_loss", float("nan"), step=r)
            mlflow.log_param("optimizer", "sgd")
            wandb.log({"epoch": float(r)}, step=r)
            flare.send(flare.FLModel(params=plus_one(model)))

    async def wf(server: FLServer) -> FLModel:
        return await fedavg(server, {"w": np.zeros(1)}, rounds=2)

    await simulate(wf, script, clients=2, on_metrics=lambda site, recs: got.extend(recs))
    by = {(r["site"], r["key"], r["step"]): r for r in got}
    for site in ("server.site-1", "server.site-2"):
        assert by[(site, "loss", 1)]["value"] == 0.5
        assert by[(site, "lr", 0)]["value"] == 0.5
        assert by[(site, "acc/train", 1)]["value"] == 0.9
        assert by[(site, "acc/val", 0)]["value"] == 0.8
        assert by[(site, "nan_loss", 0)]["value"] == "nan"
        assert by[(site, "optimizer", None)] | {"time": 0} == {
            "site": site,
            "key": "optimizer",
            "value": "sgd",
            "step": None,
            "type": "PARAMETER",
            "time": 0,
        }
        assert by[(site, "epoch", 1)]["type"] == "METRIC"
    assert len(got) == 2 * 2 * 7


def _server(members: list[str]) -> FLServer:
    return FLServer(Cell("server", drivers=[MemoryNetwork()]), members)


def test_the_server_checks_every_batch_a_site_sends() -> None:
    server = _server(["server.site-1"])
    ok = json.dumps(records("k", 1.5, "SCALAR", 3)).encode()
    assert json.loads(server.take_metrics("server.site-1", Payload((ok,)))) == {
        "kept": 1,
        "dropped": 0,
    }
    assert server.tracked[0]["site"] == "server.site-1"
    with pytest.raises(Unauthorized):
        server.take_metrics("server.site-9", Payload((ok,)))
    for bad in (
        b"{}",
        b"not json",
        b'[{"key": "k", "value": "x", "type": "SCALAR"}]',
        b'[{"key": "k", "value": 1, "type": "IMAGE"}]',
        b'[{"key": "", "value": 1}]',
        json.dumps([{"key": "k" * (MAX_KEY + 1), "value": 1}]).encode(),
        b'[{"key": "k", "value": 1, "step": true}]',
        b'[{"key": "k", "value": 1, "step": 1.5}]',
        b"[" * 100_000,
    ):
        with pytest.raises(BadRequest):
            server.take_metrics("server.site-1", Payload((bad,)))
    assert len(server.tracked) == 1  # nothing of a bad batch was kept


def test_record_edges() -> None:
    assert records("k" * MAX_KEY, 1, "SCALAR")[0]["key"] == "k" * MAX_KEY
    assert records("k", float("inf"), "METRIC")[0]["value"] == "inf"
    assert records("k", np.float32(2.5), "SCALAR")[0]["value"] == 2.5
    assert records("k", torch.tensor(0.25), "SCALAR")[0]["value"] == 0.25
    assert check_batch(b'[{"key": "k", "value": "-inf"}]')[0]["value"] == "-inf"
    with pytest.raises(TypeError):
        records("k", True, "SCALAR")  # a bool is not a number here
    with pytest.raises(TypeError):
        records("k", "0.5", "SCALAR")
    assert math.isclose(float(records("k", 10**20, "SCALAR")[0]["value"]), 1e20)


def test_the_server_keeps_at_most_its_limit_per_site(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "MAX_PER_SITE", 3)
    server = _server(["server.site-1"])
    batch = json.dumps([records("k", i, "SCALAR", i)[0] for i in range(5)]).encode()
    answer = json.loads(server.take_metrics("server.site-1", Payload((batch,))))
    assert answer == {"kept": 3, "dropped": 2}
    assert [r["step"] for r in server.tracked] == [0, 1, 2]


# ------------------------------------------------------------------ a script that fails early
def broken_at_import() -> None:
    if flare.get_site_name().endswith("site-2"):
        import missing_module_for_the_test  # type: ignore[import-not-found] # noqa: F401, PLC0415
    flare.init()
    while flare.is_running():
        model = flare.receive()
        flare.send(flare.FLModel(params=plus_one(model)))


async def test_a_script_failing_before_its_first_task_is_reported_at_once() -> None:
    # A deadline the test would time out on: the round must not wait for the broken site.
    async def wf(server: FLServer) -> FLModel:
        return await fedavg(server, {"w": np.zeros(1)}, rounds=2, min_responses=1, deadline=600)

    final = await simulate(wf, broken_at_import, clients=2)
    for entry in final.meta["history"]:
        assert entry["responded"] == ["server.site-1"]
        assert entry["failed"] == ["server.site-2"]
        why = entry["why"]["server.site-2"]
        assert "ModuleNotFoundError" in why
        assert "missing_module_for_the_test" in why


@pytest.mark.parametrize("script", [broken_at_import, "tests._fl_scripts:broken_at_import"])
async def test_a_round_that_needs_the_broken_site_fails_at_once_saying_why(script: Any) -> None:
    async def wf(server: FLServer) -> FLModel:
        return await fedavg(server, {"w": np.zeros(1)}, rounds=1, deadline=600)

    with pytest.raises(RoundFailed) as caught:
        await simulate(wf, script, clients=2)
    assert "missing_module_for_the_test" in caught.value.failed["server.site-2"]


def test_flmodel_takes_flares_arguments() -> None:
    m = FLModel(params_type="DIFF", params=None, metrics=None, meta=None, start_round=2)  # type: ignore[arg-type]
    assert m.params_type is ParamsType.DIFF
    assert (m.params, m.metrics, m.meta, m.start_round) == ({}, {}, {}, 2)
    assert ParamsType.FULL == "FULL"
    with pytest.raises(ValueError, match="FULL or DIFF"):
        FLModel(params_type="HALF")  # type: ignore[arg-type]


async def test_values_wait_while_the_server_cannot_be_reached() -> None:
    net = MemoryNetwork()
    rt = ClientRuntime(Cell("server.site-1", drivers=[net]), "server", job="j")
    async with rt.cell:  # not linked to any server: no route
        rt.log("loss", 0.5, step=1)
        assert not await rt.flush_metrics()
        assert len(rt.metrics) == 1  # kept for the next flush, not lost
        assert rt.metrics_lost == 0


def test_a_sites_buffer_keeps_the_newest_values_up_to_its_limit() -> None:
    buf = MetricsBuffer(limit=3)
    assert buf.add(records("a", 1, "SCALAR"))
    assert not buf.add([records("b", i, "SCALAR", i)[0] for i in range(3)])
    assert buf.dropped == 1
    taken = buf.take(2)
    buf.put_back(taken)
    assert [r["step"] for r in buf.take()] == [0, 1, 2]


def test_torch_params_share_the_received_bytes_unless_told_to_copy() -> None:
    """The received payload is the site's own writable buffer: torch tensors are views of it
    (no copy of a large model); a filter that keeps the arrays gets copies; bf16 stays bf16;
    read-only bytes are copied, never made writable."""
    model = FLModel(params={"w": np.arange(4, dtype=np.float32), "h": torch.ones(2).bfloat16()})
    received = bytearray(b"".join(bytes(p) for p in model_parts(model, CodecRegistry())))
    arrays, _ = decode(memoryview(received))
    shared = to_framework(dict(arrays), "torch")
    assert shared["w"].data_ptr() == arrays["w"].ctypes.data  # the same bytes
    assert shared["h"].dtype == torch.bfloat16
    assert shared["h"].tolist() == [1.0, 1.0]
    copied = to_framework(dict(decode(memoryview(received))[0]), "torch", share=False)
    assert copied["w"].data_ptr() != arrays["w"].ctypes.data
    frozen, _ = decode(bytes(received))  # immutable bytes: a copy, the source stays read-only
    t = to_framework(dict(frozen), "torch")["w"]
    t += 1
    assert frozen["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


async def test_a_worker_that_garbles_its_values_loses_only_those() -> None:
    got: list[dict[str, Any]] = []

    async def wf(server: FLServer) -> FLModel:
        return await fedavg(server, {"w": np.zeros(1)}, rounds=2, deadline=60)

    final = await simulate(
        wf,
        "tests._fl_scripts:garbles_its_metrics",
        clients=2,
        on_metrics=lambda site, recs: got.extend(recs),
    )
    assert all(h["failed"] == [] for h in final.meta["history"])  # the job went on
    assert sorted((r["site"], r["step"]) for r in got) == [
        (s, r) for s in ("server.site-1", "server.site-2") for r in range(2)
    ]
    assert {r["key"] for r in got} == {"good"}
