"""Recipes: a job as data (workflow settings + client script + config), runnable in the
simulator (``recipe.simulate(...)``, ``flare-async simulate MODULE:RECIPE``) or submitted to a
deployment (``flare-async job submit MODULE:RECIPE``), unchanged."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import anyio.to_thread
import numpy as np

from flare_async._spec import load_object
from flare_async.errors import ConfigError
from flare_async.fl import _checkpoint as checkpoint
from flare_async.fl._crosssite import cross_site_eval
from flare_async.fl._cyclic import cyclic
from flare_async.fl._model import FLModel
from flare_async.fl._scripts import script_spec
from flare_async.fl._secure import SecureAggregation
from flare_async.fl._server import RoundResult, Rounds
from flare_async.fl._simulator import simulate
from flare_async.fl._strategies import FedAvg
from flare_async.fl._swarm import swarm
from flare_async.fl._workflows import fedavg


@dataclass
class FedAvgRecipe:
    """FedAvg as a job.

    Attributes:
        initial: the initial model's parameters (or a function returning them).
        script: the client's training script: a function (run in a worker thread) or
            ``"MODULE:FUNCTION"`` (run in its own process per site).
        rounds / fraction / min_clients / min_responses / deadline: see ``fedavg``.
        config: what each site's ``get_config()`` returns (with ``site_index``).
        codec: how models travel both ways (``tensors``, ``fp16``, ``bf16``, ``q8``, ``nf4``,
            ``fp4``).
        evaluate / validation_key: server-side validation and best-round selection.
        checkpoints: a folder for ``last`` / ``best`` checkpoints (and resuming).
        relay_aggregation: on a deployment, relays fold their sites' results (one partial
            sum each goes up). Off, relays only forward, and the server checks every site's
            own signature: for relays not trusted to aggregate (see docs/threat-model.md).
        secure: secure aggregation in every round (the server learns only the sum): ``True``
            (the default range), ``SecureAggregation(clip=, max_weight=, ...)``, or a mapping
            of those fields (what ``job submit --secure-clip ...`` sends).
        encrypt: on a deployment, results are sealed for the server's key: relays forward
            what they cannot read (relay aggregation is then off).
        strategy: the algorithm on FedAvg's loop (default FedAvg): ``FedProx(mu=)``,
            ``FedOpt(optimizer=, lr=)``, ``Scaffold(lr=)``, ``Robust(rule=)``, ``Ditto(lam=)``
            (see docs/fl.md, "Algorithms").
        cross_site_eval: after the last round, every site's model and the global one are
            evaluated on every site (``validate`` / ``submit_model`` tasks); the matrix is
            the final model's ``meta["cross_site"]`` and the job's report.
    """

    initial: Mapping[str, Any] | Callable[[], Mapping[str, Any]]
    script: Callable[[], object] | str
    rounds: int = 5
    fraction: float = 1.0
    min_clients: int = 1
    min_responses: int | None = None
    deadline: float = 60.0
    config: dict[str, Any] = field(default_factory=dict)
    codec: str = "tensors"
    evaluate: Callable[[int, dict[str, np.ndarray]], Mapping[str, float]] | None = None
    validation_key: str | None = None
    checkpoints: str | None = None
    relay_aggregation: bool = True
    secure: bool | SecureAggregation | Mapping[str, Any] = False
    encrypt: bool = False
    strategy: FedAvg = field(default_factory=FedAvg)
    cross_site_eval: bool = False
    peers_in_simulation: ClassVar[bool] = False
    """The simulator links the sites to each other directly (cyclic training)."""
    sums: ClassVar[bool] = True
    """The server sums the sites' results (what secure aggregation protects)."""

    def __post_init__(self) -> None:
        secure = SecureAggregation.of(self.secure)  # ConfigError, SecAggRangeError: now
        if not isinstance(self.strategy, FedAvg):
            raise ConfigError(
                f"a recipe's strategy is a FedAvg, FedProx..., not {self.strategy!r:.80}"
            )
        if secure is not None and not (self.sums and self.strategy.secure_ok):
            what = self.strategy.name if self.sums else type(self).__name__
            raise ConfigError(f"{what} does not run under secure aggregation")

    @staticmethod
    def load(spec: str, overrides: Mapping[str, Any] | None = None) -> FedAvgRecipe:
        """The recipe ``MODULE:NAME`` names (what ``flare-async simulate`` and ``job submit``
        take), with ``overrides``: see :func:`load_recipe`.

        Raises:
            ConfigError: see :func:`load_recipe`.
        """
        return load_recipe(spec, overrides)

    async def run(
        self,
        server: Rounds,
        *,
        checkpoints: str | None = None,
        on_checkpoint: Callable[[int], None] | None = None,
    ) -> FLModel:
        """Run the job's workflow on ``server`` (its checkpoints in ``checkpoints``, default
        the recipe's own; ``on_checkpoint(round)`` after each is written), then, with
        ``cross_site_eval``, the evaluation. On a deployment this runs in the job's own
        process (``flare_async.fl._jobproc``), never the server's."""
        initial = (
            await anyio.to_thread.run_sync(self.initial) if callable(self.initial) else self.initial
        )
        folder = checkpoints if checkpoints is not None else self.checkpoints
        final = await self.train(server, initial, folder, on_checkpoint)
        if self.cross_site_eval:
            final.meta["cross_site"] = await cross_site_eval(
                server, final.params, deadline=self.deadline
            )
        return final

    async def train(
        self,
        server: Rounds,
        initial: Mapping[str, Any],
        checkpoints: str | None,
        on_checkpoint: Callable[[int], None] | None,
    ) -> FLModel:
        """The recipe's workflow (FedAvg's loop with the recipe's strategy)."""
        return await fedavg(
            server,
            initial,
            rounds=self.rounds,
            fraction=self.fraction,
            min_clients=self.min_clients,
            min_responses=self.min_responses,
            deadline=self.deadline,
            evaluate=self.evaluate,
            validation_key=self.validation_key,
            checkpoints=checkpoints,
            on_checkpoint=on_checkpoint,
            secure=SecureAggregation.of(self.secure) or False,
            strategy=self.strategy,
        )

    def script_spec(self) -> str:
        """The script as ``MODULE:FUNCTION``, for a site that runs it in its own process.

        Raises:
            ConfigError: the script is a function that cannot be imported by name (a closure,
                a lambda, or one defined in ``__main__``).
        """
        return script_spec(self.script)

    async def simulate(
        self,
        clients: int = 2,
        *,
        relays: int = 0,
        on_round: Callable[[RoundResult], None] | None = None,
        processes: bool = False,
        backend: Literal["local", "ray"] = "local",
        actors: int | None = None,
        ray_address: str | None = None,
    ) -> FLModel:
        """Run the job in the simulator (one process, scripts in threads or their own
        processes; or, with ``processes``, each site its own process over tcp; or, with
        ``backend="ray"``, the sites and relays in ``actors`` Ray actors: see ``simulate``)."""
        result: FLModel = await simulate(
            self.run,
            self.script,
            clients=clients,
            relays=relays,
            processes=processes,
            peers=self.peers_in_simulation and not processes,
            config=self.config,
            codec=self.codec,
            on_round=on_round,
            backend=backend,
            actors=actors,
            ray_address=ray_address,
        )
        return result


def load_recipe(spec: str, overrides: Mapping[str, Any] | None = None) -> FedAvgRecipe:
    """The recipe ``MODULE:NAME`` names: a :class:`FedAvgRecipe`, or a function *declared* to
    return one (``def recipe(...) -> FedAvgRecipe``), which is called with those of the
    ``overrides`` it takes as parameters (so that what it builds from them, an ``evaluate``
    that counts rounds, agrees), and no other arguments; then every override is applied
    (:func:`apply_overrides`). Nothing else named is ever called: a job's spec comes from an
    admin, and ``os:abort`` or ``signal:pause`` must not run in the server.

    Raises:
        ConfigError: it does not load, is neither a recipe nor a declared recipe factory, the
            factory returned something else, or an override is not allowed.
    """
    overrides = dict(overrides or {})
    obj = load_object(spec, "recipe", "recipe")
    if isinstance(obj, FedAvgRecipe):
        return apply_overrides(obj, overrides)
    if not declares_recipe(obj):
        raise ConfigError(
            f"{spec} is a {type(obj).__name__}, neither a recipe nor a function declared to "
            "return one (-> FedAvgRecipe); it was not called"
        )
    takes = set(inspect.signature(obj).parameters)
    recipe = obj(**{k: v for k, v in overrides.items() if k in takes and k in OVERRIDES})
    if not isinstance(recipe, FedAvgRecipe):
        raise ConfigError(f"{spec} returned a {type(recipe).__name__}, not a recipe")
    return apply_overrides(recipe, overrides)


def declares_recipe(obj: object) -> bool:
    """Whether ``obj`` is a plain Python function whose return annotation is a recipe class
    (built-ins, classes and other callables are not)."""
    if not inspect.isfunction(obj):
        return False
    try:
        returns = typing.get_type_hints(obj).get("return")
    except Exception:
        return False
    return isinstance(returns, type) and issubclass(returns, FedAvgRecipe)


OVERRIDES = (
    "rounds",
    "codec",
    "min_clients",
    "min_responses",
    "deadline",
    "fraction",
    "relay_aggregation",
    "secure",
    "encrypt",
)
"""Recipe attributes a submission may override."""


def apply_overrides(recipe: FedAvgRecipe, overrides: Mapping[str, Any]) -> FedAvgRecipe:
    """``recipe`` with a submission's overrides (only :data:`OVERRIDES`).

    Raises:
        ConfigError: an attribute that may not be overridden, or a value the recipe refuses.
    """
    bad = sorted(set(overrides) - set(OVERRIDES))
    if bad:
        raise ConfigError(f"cannot override {bad}; allowed: {list(OVERRIDES)}")
    try:
        return dataclasses.replace(recipe, **overrides)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"the overrides do not fit the recipe: {exc}") from None


@dataclass
class CyclicRecipe(FedAvgRecipe):
    """Cyclic training as a job (see ``cyclic``): the model walks the sites round after round,
    handed site to site directly (``direct``; in the simulator over peer links between the
    sites, on a deployment through the cells between them, which forward it undecoded);
    ``shuffle`` walks them in a new order each round. FedAvg's ``fraction``, ``strategy``,
    ``secure`` and relay aggregation do not apply; ``cross_site_eval`` does."""

    direct: bool = True
    shuffle: bool = False
    peers_in_simulation: ClassVar[bool] = True
    sums: ClassVar[bool] = False

    async def train(
        self,
        server: Rounds,
        initial: Mapping[str, Any],
        checkpoints: str | None,
        on_checkpoint: Callable[[int], None] | None,
    ) -> FLModel:
        return await cyclic(
            server,
            initial,
            rounds=self.rounds,
            shuffle=self.shuffle,
            direct=self.direct,
            deadline=self.deadline,
            evaluate=self.evaluate,
            checkpoints=checkpoints,
            on_checkpoint=on_checkpoint,
        )


@dataclass
class SwarmRecipe(FedAvgRecipe):
    """Swarm learning as a job (see ``swarm``): the server starts it and records it; the sites
    run the rounds among themselves, each round aggregated by the next site in turn, models
    exchanged site to site (in the simulator over peer links). ``min_responses``: results a
    round needs (default all). FedAvg's ``fraction``, ``strategy``, ``secure`` and relay
    aggregation do not apply."""

    peers_in_simulation: ClassVar[bool] = True
    sums: ClassVar[bool] = False

    async def train(
        self,
        server: Rounds,
        initial: Mapping[str, Any],
        checkpoints: str | None,
        on_checkpoint: Callable[[int], None] | None,
    ) -> FLModel:
        final = await swarm(
            server,
            initial,
            rounds=self.rounds,
            deadline=self.deadline,
            min_responses=self.min_responses,
        )
        scores = (
            await anyio.to_thread.run_sync(self.evaluate, self.rounds - 1, final.params)
            if self.evaluate
            else {}
        )
        history = [{"round": self.rounds - 1, "validation": dict(scores), **final.meta["swarm"]}]
        final.meta["history"] = history
        if checkpoints is not None:  # the final model, as the server got it
            folder = Path(checkpoints)
            await anyio.to_thread.run_sync(lambda: folder.mkdir(parents=True, exist_ok=True))
            state = checkpoint.Checkpoint(self.rounds - 1, final.params, history)
            await checkpoint.save(folder, "last", state)
            if on_checkpoint is not None:
                on_checkpoint(self.rounds - 1)
        return final
