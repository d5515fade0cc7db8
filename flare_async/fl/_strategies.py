"""The server halves of the FL algorithms: what a round sends and how its results step the model.

FedAvg's loop (``fl/_workflows.fedavg``) is the same for all of them; a *strategy* says what
goes into each task beside the model (FedProx's μ, SCAFFOLD's control variate) and how the
round's results become the next model (a weighted mean, a server optimizer's step, a robust
rule over every update). A strategy is configuration only (frozen, a recipe's field): what
it carries from round to round is its ``state``, a dict of tensors the workflow keeps and
checkpoints with the model, so a restarted server resumes it exactly.

=========  =====================================================  ========  ==========
strategy   the next model                                          collects  relays fold
=========  =====================================================  ========  ==========
FedAvg     the weighted mean of the results                        sum       yes
FedProx    as FedAvg; μ goes to the sites (their proximal term)    sum       yes
Ditto      as FedAvg; λ goes to the sites (their personal model)   sum       yes
FedOpt     a server optimizer steps on mean - model                sum       yes
Scaffold   model + lr·(mean - model); c += (|S|/N)·mean(Δc)        sum       yes
Robust     model + a robust rule over every site's update          each      no
=========  =====================================================  ========  ==========
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from flare_async.errors import ConfigError
from flare_async.fl._aggregate import checked_weight, fedavg_step, to_dtype
from flare_async.fl._checks import misfit
from flare_async.fl._fedopt import ServerOptimizer
from flare_async.fl._keys import DITTO_LAMBDA, FEDPROX_MU, SCAFFOLD_CONTROL
from flare_async.fl._model import ParamsType
from flare_async.fl._results import RoundResult
from flare_async.fl._robust import NotEnoughUpdates, RobustAggregation
from flare_async.fl._server import Collect
from flare_async.fl._updates import Updates

Params = dict[str, np.ndarray]
State = dict[str, np.ndarray]


@dataclass(frozen=True)
class FedAvg:
    """Federated averaging (McMahan et al. 2017): the next model is the results' weighted mean
    (see ``fedavg_step``: FULL or DIFF results, some tensors or all)."""

    name: ClassVar[str] = "fedavg"
    collect: ClassVar[Collect] = "sum"
    secure_ok: ClassVar[bool] = True
    """Whether it runs under secure aggregation (it needs only the sum of the results)."""

    def meta(self) -> dict[str, Any]:
        """What every task's ``meta`` carries for the sites' scripts."""
        return {}

    def task_params(self, params: Params, state: State) -> Params:
        """What the task's params are: the model (and whatever travels beside it)."""
        return params

    def step(
        self, params: Params, result: RoundResult, state: State, clients: int
    ) -> tuple[Params, dict[str, Any]]:
        """The next model from the round's ``result`` (``state`` updated in place); and what
        to note in the round's history. ``clients``: the number of the job's sites."""
        return fedavg_step(params, result.sum, consume=True), {}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}


@dataclass(frozen=True)
class FedProx(FedAvg):
    """FedProx (Li et al. 2020): FedAvg on the server; each site adds ``mu/2·||w - w_g||²``
    to its loss (``flare_async.client.algorithms.prox_term``), ``mu`` sent with every task
    (``meta["fedprox_mu"]``)."""

    name: ClassVar[str] = "fedprox"
    mu: float = 0.01

    def __post_init__(self) -> None:
        _non_negative("FedProx's mu", self.mu)

    def meta(self) -> dict[str, Any]:
        return {FEDPROX_MU: float(self.mu)}


@dataclass(frozen=True)
class Ditto(FedAvg):
    """Ditto (Li et al. 2021): FedAvg of the sites' global-model updates; each site also keeps
    a personal model trained with ``lam/2·||v - w_g||²`` (``client.algorithms.Ditto``),
    ``lam`` sent with every task (``meta["ditto_lambda"]``). Personal models never leave."""

    name: ClassVar[str] = "ditto"
    lam: float = 0.1

    def __post_init__(self) -> None:
        _non_negative("Ditto's lam", self.lam)

    def meta(self) -> dict[str, Any]:
        return {DITTO_LAMBDA: float(self.lam)}


@dataclass(frozen=True)
class FedOpt(FedAvg):
    """FedOpt (Reddi et al. 2021): a server optimizer steps on the pseudo-gradient ``mean -
    model``: ``optimizer`` is ``adam``, ``yogi``, ``adagrad``, ``avgm`` (FedAvgM, Hsu et al.
    2019) or ``sgd`` (``lr=1``: FedAvg). Its moments are the strategy's state: checkpointed
    with the model, resumed with the job."""

    name: ClassVar[str] = "fedopt"
    optimizer: Literal["sgd", "avgm", "adam", "yogi", "adagrad"] = "adam"
    lr: float = 0.01
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        self._optimizer()  # ConfigError now, at the recipe

    def _optimizer(self) -> ServerOptimizer:
        return ServerOptimizer(
            self.optimizer,
            lr=self.lr,
            momentum=self.momentum,
            beta1=self.beta1,
            beta2=self.beta2,
            tau=self.tau,
        )

    def step(
        self, params: Params, result: RoundResult, state: State, clients: int
    ) -> tuple[Params, dict[str, Any]]:
        target = fedavg_step(params, result.sum, consume=True)
        opt = self._optimizer()
        opt.load_state(state)
        out = opt.step(params, target)
        state.clear()
        state.update(opt.state())
        return out, {}


@dataclass(frozen=True)
class Scaffold(FedAvg):
    """SCAFFOLD (Karimireddy et al. 2020): every task carries the server's control variate
    ``c`` beside the model (tensor ``scaffold.c/NAME`` for each floating tensor ``NAME``);
    each site corrects its steps with it and sends its model's change and its control's
    change (``client.algorithms.Scaffold``). The next model is ``x + lr·(mean - x)`` (the
    results' weighted mean, as FedAvg); ``c += (|S|/N)·mean(Δc)``, the same weights, ``|S|``
    the sites that answered, ``N`` the job's sites. ``c`` is the strategy's state. Results
    may be FULL or DIFF (FLARE's scripts send either); a script never sees ``c`` among its
    params (the Client API hands it over in ``meta``), so none can echo it back as a change."""

    name: ClassVar[str] = "scaffold"
    secure_ok: ClassVar[bool] = False
    lr: float = 1.0
    """The server's learning rate η_g."""

    def __post_init__(self) -> None:
        if not (np.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"SCAFFOLD's server lr must be a finite number > 0, not {self.lr!r}")

    def task_params(self, params: Params, state: State) -> Params:
        out = dict(params)
        for name, value in params.items():
            if value.dtype.kind == "f":
                key = SCAFFOLD_CONTROL + name
                control = state.get(key)
                if control is None or control.shape != value.shape:
                    control = state[key] = np.zeros(value.shape, np.float32)
                out[key] = control
        return out

    def step(
        self, params: Params, result: RoundResult, state: State, clients: int
    ) -> tuple[Params, dict[str, Any]]:
        answered = len(result.responded)
        mean = fedavg_step(params, result.sum, consume=True)
        out: Params = {}
        for name, value in mean.items():
            if name.startswith(SCAFFOLD_CONTROL):
                if name[len(SCAFFOLD_CONTROL) :] not in params:
                    continue  # a control for no tensor of the model: ignored
                # Not a tensor of ``params``: fedavg_step gave its mean as it is, mean(Δc).
                change = value.astype(np.float32, copy=False)
                change *= np.float32(answered / max(clients, 1))
                c = state.get(name)
                if c is not None:
                    change += c
                state[name] = change
                continue
            x = params.get(name)
            if x is None or x.dtype.kind != "f" or self.lr == 1.0:
                out[name] = value
            else:
                step = x.astype(value.dtype) + self.lr * (value - x)
                out[name] = to_dtype(step, x.dtype)
        return out, {}


@dataclass(frozen=True)
class Robust(FedAvg):
    """Robust aggregation: every site's update (its DIFF, or its FULL model minus the global
    one) is kept and a robust rule combines them: ``rule`` is a ``RobustAggregation``
    (median, trimmed_mean, krum, multi_krum, bulyan, clipped_mean). Unlike FedAvg's running
    sum, this needs every update of the round at once: in memory up to a bound, then in
    spill files, one tensor's slices at a time; relays forward rather than fold. An update
    must carry every tensor of the model and no other (no partial updates); one that does
    not, or holds a non-finite value, is dropped and named in the round's history."""

    name: ClassVar[str] = "robust"
    collect: ClassVar[Collect] = "each"
    secure_ok: ClassVar[bool] = False
    rule: RobustAggregation = field(default_factory=lambda: RobustAggregation("median"))
    weighted: bool = False
    """Weigh ``multi_krum``'s and ``clipped_mean``'s means by the sites' reported sample
    counts. Off by default: a hostile site would report a huge count."""

    def step(
        self, params: Params, result: RoundResult, state: State, clients: int
    ) -> tuple[Params, dict[str, Any]]:
        updates = result.updates
        assert updates is not None, "a robust round keeps each update"
        # The model is the template: an update that does not fit it is dropped here, so no
        # site (the first to answer, say) decides what the others' updates must look like.
        dropped: dict[str, str] = {}
        kept: list[int] = []
        for i, model in enumerate(updates.models):
            why = misfit(params, model)
            if why:
                dropped[updates.sites[i]] = why
            else:
                kept.append(i)
        kept.sort(key=lambda i: updates.sites[i])  # ties never go by arrival order
        weights = updates.weights() if self.weighted else [1.0] * len(updates)
        try:
            return self._combine(params, updates, kept, weights, dropped)
        except NotEnoughUpdates as exc:  # the round is skipped: say whom it could not use
            exc.note = {"robust": {"selected": [], "dropped": dropped}}
            raise

    def _combine(
        self,
        params: Params,
        updates: Updates,
        kept: list[int],
        weights: list[float],
        dropped: dict[str, str],
    ) -> tuple[Params, dict[str, Any]]:
        if not any(weights[i] > 0 for i in kept):  # (weighted) all of them weigh 0
            raise NotEnoughUpdates(self.rule.rule, 0, self.rule.minimum_updates(), len(kept))
        models = [updates.models[i] for i in kept]
        # FULL results are read minus the model a slice at a time (never whole copies).
        bases = [None if m.params_type is ParamsType.DIFF else params for m in models]
        change, report = self.rule.aggregate_with_report(
            [m.params for m in models], [weights[i] for i in kept], bases
        )
        out = dict(params)
        for name, delta in change.items():
            g = params[name]
            out[name] = to_dtype(g.astype(delta.dtype) + delta, g.dtype)
        sites = [updates.sites[i] for i in kept]
        dropped.update({sites[i]: why for i, why in report.dropped.items()})
        note = {"selected": [sites[i] for i in report.selected], "dropped": dropped}
        return out, {"robust": note}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self.rule), "weighted": self.weighted}


def _non_negative(what: str, value: float) -> None:
    """Raises ConfigError: ``value`` is not a finite number >= 0 (as a result's weight)."""
    try:
        checked_weight(value, what)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


__all__ = ["Ditto", "FedAvg", "FedOpt", "FedProx", "Robust", "Scaffold"]
