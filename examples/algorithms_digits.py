"""Compare the FL algorithms on one task: digits split non-IID (Dirichlet alpha=0.3) over 8 sites.

scikit-learn's digits (1,797 8x8 images, shipped inside the package: nothing is downloaded);
each class is spread over the sites by a Dirichlet(alpha) draw with a fixed seed, so most sites
hold a few classes mostly. The model is a softmax regression in numpy (64 x 10 weights), trained
by plain SGD on each site; the same script runs every algorithm: it reads what the task carries
(FedProx's μ, SCAFFOLD's control variate, Ditto's λ) with the client helpers of
:mod:`flare_async.client.algorithms`, and answers ``validate`` and ``submit_model`` tasks for
cross-site evaluation. Sites named in ``config["attack"]`` send poisoned updates (scaled, or
sign-flipped), to show what robust aggregation is for.

    python examples/algorithms_digits.py [--rounds 20] [--only fedavg,scaffold]

prints each algorithm's global test accuracy after the rounds (tests/fl/
test_algorithms_converge.py runs it; docs/algorithms.md quotes its figures).
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any

import anyio
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import flare_async.client as flare
from flare_async.client.algorithms import Ditto as DittoSite
from flare_async.client.algorithms import Scaffold as ScaffoldSite
from flare_async.client.algorithms import fedprox_mu, prox_grad
from flare_async.fl import (
    SCAFFOLD_CTRL_GLOBAL,
    Ditto,
    FedAvg,
    FedAvgRecipe,
    FedOpt,
    FedProx,
    FLModel,
    ParamsType,
    Robust,
    RobustAggregation,
    Scaffold,
)

SITES = 8
ALPHA = 0.3
Params = dict[str, np.ndarray]


@functools.cache
def load() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and test sets (75% / 25%, stratified, fixed)."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    out: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] = tuple(
        train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    )
    return out


@functools.cache
def split(sites: int = SITES, alpha: float = ALPHA, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Each site's indices into the training set: every class spread over the sites by a
    Dirichlet(alpha) draw (at least 10 samples per site)."""
    _, _, y, _ = load()
    rng = np.random.default_rng(seed)
    while True:
        parts: list[list[int]] = [[] for _ in range(sites)]
        for cls in range(10):
            idx = rng.permutation(np.flatnonzero(y == cls))
            shares = rng.dirichlet(np.full(sites, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for s, chunk in enumerate(np.split(idx, cuts)):
                parts[s].extend(chunk.tolist())
        if min(len(p) for p in parts) >= 10:
            return tuple(np.array(sorted(p)) for p in parts)


def site_data(site: int, sites: int = SITES, alpha: float = ALPHA) -> tuple[np.ndarray, ...]:
    """Site ``site``'s (x_train, y_train, x_val, y_val): its share, 80% / 20%."""
    x, _, y, _ = load()
    idx = split(sites, alpha)[site]
    cut = int(0.8 * len(idx))
    return x[idx[:cut]], y[idx[:cut]], x[idx[cut:]], y[idx[cut:]]


def initial(seed: int = 0) -> Params:
    rng = np.random.default_rng(seed)
    return {
        "w": (0.01 * rng.standard_normal((64, 10))).astype(np.float32),
        "b": np.zeros(10, np.float32),
    }


def logits(params: Params, x: np.ndarray) -> np.ndarray:
    out: np.ndarray = x @ np.asarray(params["w"]) + np.asarray(params["b"])
    return out


def grads(params: Params, x: np.ndarray, y: np.ndarray) -> tuple[Params, float]:
    """The cross-entropy's gradient on a batch, and its loss."""
    z = logits(params, x)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    loss = float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())
    p[np.arange(len(y)), y] -= 1
    p /= len(y)
    return {"w": (x.T @ p).astype(np.float32), "b": p.sum(axis=0).astype(np.float32)}, loss


def accuracy(params: Params, x: np.ndarray, y: np.ndarray) -> float:
    return float((logits(params, x).argmax(axis=1) == y).mean()) if len(y) else 0.0


def sgd(
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    rng: np.random.Generator,
    *,
    epochs: int,
    lr: float,
    batch: int,
    correct: Any = None,
) -> tuple[Params, int, float]:
    """Local SGD; ``correct(params, grads) -> grads`` changes each step's gradient (FedProx's
    term, SCAFFOLD's correction). Returns the params, the steps taken and the last loss."""
    p = {k: np.array(v, dtype=np.float32) for k, v in params.items()}
    steps, loss = 0, 0.0
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for i in range(0, len(y), batch):
            b = order[i : i + batch]
            g, loss = grads(p, x[b], y[b])
            if correct is not None:
                g = correct(p, g)
            for k in p:
                p[k] -= lr * np.asarray(g[k], dtype=np.float32)
            steps += 1
    return p, steps, loss


def train() -> None:
    """Every site's script, for every algorithm (see the module's docstring)."""
    flare.init()
    cfg = flare.get_config()
    site, sites = int(cfg["site_index"]), int(cfg.get("sites", SITES))
    x, y, xv, yv = site_data(site, sites, float(cfg.get("alpha", ALPHA)))
    epochs, lr, batch = int(cfg.get("epochs", 2)), float(cfg.get("lr", 0.1)), 16
    attack = str(dict(cfg.get("attack", {})).get(str(site), ""))
    rng = np.random.default_rng(1000 * int(cfg.get("seed", 0)) + site)
    scaffold, ditto = ScaffoldSite(), DittoSite()
    mine: Params | None = None  # this site's last trained model (submit_model)
    while flare.is_running():
        task = flare.receive()
        if task is None:
            break
        kind = flare.get_task_name()
        if kind == "validate":
            flare.send(FLModel(metrics={"accuracy": accuracy(task.params, xv, yv)}))
            continue
        if kind == "submit_model":
            mine_or_global = mine if mine is not None else task.params
            if ditto.personal:
                mine_or_global = ditto.personal
            flare.send(FLModel(params=dict(mine_or_global)))
            continue
        with_controls = SCAFFOLD_CTRL_GLOBAL in task.meta  # the Client API puts c there
        base = scaffold.receive(task) if with_controls else dict(task.params)
        mu = fedprox_mu(task)

        def correct(
            p: Params,
            g: Params,
            base: Params = base,
            mu: float = mu,
            scaffold_on: bool = with_controls,
        ) -> Params:
            if mu:
                g = prox_grad(g, p, base, mu)
            if scaffold_on:
                g = scaffold.corrected(g)
            return g

        new, steps, loss = sgd(base, x, y, rng, epochs=epochs, lr=lr, batch=batch, correct=correct)
        mine = new
        lam = ditto.lam(task)
        if lam:  # the personal model: its own steps, pulled towards the global model
            personal = ditto.personal or {k: np.array(v) for k, v in base.items()}
            pers, _, _ = sgd(
                personal,
                x,
                y,
                rng,
                epochs=epochs,
                lr=lr,
                batch=batch,
                correct=lambda p, g, base=base, lam=lam: ditto.prox_grad(g, p, base),
            )
            ditto.keep(pers)
        meta = {"num_samples": len(y)}
        metrics = {"loss": loss, "local_accuracy": accuracy(new, xv, yv)}
        if with_controls:
            result = scaffold.result(new, steps=steps, lr=lr, meta=meta, metrics=metrics)
        else:
            result = FLModel(params=new, meta=meta, metrics=metrics)
        flare.send(poisoned(result, base, attack))


def poisoned(result: FLModel, base: Params, attack: str) -> FLModel:
    """``result`` as an attacker sends it: ``scale`` (update x 20), ``flip`` (update x -4)."""
    if not attack:
        return result
    factor = {"scale": 20.0, "flip": -4.0}[attack]
    out: Params = {}
    for k, value in result.params.items():
        v = np.asarray(value)
        if result.params_type is ParamsType.DIFF or k not in base:
            out[k] = (factor * v).astype(v.dtype)
        else:
            g = np.asarray(base[k])
            out[k] = (g + factor * (v - g)).astype(v.dtype)
    return FLModel(params=out, params_type=result.params_type, meta=result.meta, metrics={})


ALGORITHMS: dict[str, FedAvg] = {
    "fedavg": FedAvg(),
    "fedprox": FedProx(mu=0.1),
    "fedopt-adam": FedOpt(optimizer="adam", lr=0.05),
    "fedavgm": FedOpt(optimizer="avgm", lr=1.0, momentum=0.5),
    "scaffold": Scaffold(),
    "ditto": Ditto(lam=1.0),
    "median": Robust(RobustAggregation("median")),
    "trimmed-mean": Robust(RobustAggregation("trimmed_mean", f=2)),
    "krum": Robust(RobustAggregation("multi_krum", f=2)),
}


def recipe(
    algorithm: str = "fedavg",
    rounds: int = 20,
    *,
    sites: int = SITES,
    epochs: int = 2,
    lr: float = 0.1,
    attack: dict[str, str] | None = None,
    cross_site_eval: bool = False,
    checkpoints: str | None = None,
    strategy: FedAvg | None = None,
) -> FedAvgRecipe:
    """One algorithm as a job (``ALGORITHMS`` names them), validated on the test set each round."""
    _, x_test, _, y_test = load()

    def evaluate(rnd: int, params: Params) -> dict[str, float]:
        return {"accuracy": accuracy(params, x_test, y_test)}

    return FedAvgRecipe(
        initial=initial(),
        script=train,
        rounds=rounds,
        config={"epochs": epochs, "lr": lr, "sites": sites, "attack": dict(attack or {})},
        evaluate=evaluate,
        validation_key="accuracy",
        strategy=strategy if strategy is not None else ALGORITHMS[algorithm],
        cross_site_eval=cross_site_eval,
        checkpoints=checkpoints,
    )


async def compare(names: list[str], rounds: int) -> dict[str, float]:
    out = {}
    for name in names:
        start = time.perf_counter()
        final = await recipe(name, rounds).simulate(clients=SITES)
        acc = final.meta["history"][-1]["validation"]["accuracy"]
        out[name] = acc
        print(f"{name:14s} {acc:6.1%} after {rounds} rounds ({time.perf_counter() - start:.1f} s)")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--only", default=",".join(ALGORITHMS), help="comma-separated names")
    args = p.parse_args()
    anyio.run(compare, args.only.split(","), args.rounds)


if __name__ == "__main__":
    main()
