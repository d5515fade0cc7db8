"""The main demo: FedAvg trains a PyTorch classifier on handwritten digits across 4 simulated sites.

The data is scikit-learn's digits (1,797 8x8 images, shipped inside the package: nothing is
downloaded), split non-IID: each site holds mostly four of the ten classes. A server cell and
four site cells run in this process over ``memory://``; each site runs an ordinary training
script that uses the Client API (``flare_async.client``), in a worker thread. After every round
the demo evaluates the new global model on a held-out test set and prints its accuracy.

    python examples/fedavg_digits.py [--rounds 15] [--codec tensors|q8|nf4] [--seed 0]

``--codec`` quantizes the model traffic both ways (server to sites and back). ``--seed`` picks
the initial model and the sites' shuffles (the data split stays the same).
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any

import anyio
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import flare_async.client as flare
from flare_async.fl import FedAvgRecipe, FLModel

SITES = 4
torch.set_num_threads(1)


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def load() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)


def split_non_iid(x: np.ndarray, y: np.ndarray, sites: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Site i gets 80% of its four 'home' classes' samples and a thin share of the others."""
    rng = np.random.default_rng(0)
    parts: list[list[int]] = [[] for _ in range(sites)]
    for cls in range(10):
        idx = rng.permutation(np.flatnonzero(y == cls))
        home = [s for s in range(sites) if cls in {(2 * s + k) % 10 for k in range(4)}]
        cut = int(0.8 * len(idx))
        for j, i in enumerate(idx[:cut]):
            parts[home[j % len(home)] if home else j % sites].append(i)
        for j, i in enumerate(idx[cut:]):
            parts[j % sites].append(i)
    return [(x[p], y[p]) for p in parts]


def accuracy(params: dict[str, Any], x: np.ndarray, y: np.ndarray) -> float:
    model = make_model()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in params.items()})
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())


@functools.cache
def site_data(site: int, sites: int = SITES) -> tuple[np.ndarray, np.ndarray]:
    """Site ``site``'s share of the training set (the same split wherever it is computed)."""
    x_train, _, y_train, _ = load()
    return split_non_iid(x_train, y_train, sites)[site]


def train(epochs: int = 2) -> None:
    """What a site runs: an ordinary PyTorch loop with four Client API calls. Its data is the
    site's share of digits (``site_index`` of ``sites`` in the job's config; ``seed`` picks its
    shuffles)."""
    flare.init()
    config = flare.get_config()
    site = int(config["site_index"])
    x, y = site_data(site, int(config.get("sites", SITES)))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    seed = int(config.get("seed", 0))
    shuffle = torch.Generator().manual_seed(1000 * seed + site)  # per site: reproducible
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        model.load_state_dict(
            {k: torch.from_numpy(np.array(v)) for k, v in received.params.items()}
        )
        for _ in range(epochs):
            perm = torch.randperm(len(xt), generator=shuffle)
            for i in range(0, len(xt), 32):
                b = perm[i : i + 32]
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(xt[b]), yt[b])
                loss.backward()
                opt.step()
        flare.send(
            FLModel(
                params={k: v.detach().numpy() for k, v in model.state_dict().items()},
                meta={"num_samples": len(xt)},
                metrics={"loss": float(loss.detach())},
            )
        )


def recipe(
    rounds: int = 15, codec: str = "tensors", quiet: bool = False, seed: int = 0
) -> FedAvgRecipe:
    """The demo as a job: ``flare-async simulate examples.fedavg_digits:recipe --clients 4``,
    or ``flare-async job submit examples.fedavg_digits:recipe`` on a deployment."""
    _, x_test, _, y_test = load()
    start = time.perf_counter()

    def evaluate(rnd: int, params: dict[str, np.ndarray]) -> dict[str, float]:
        # The demo holds a test set; in a deployment the server validates on its own data.
        acc = accuracy(params, x_test, y_test)
        if not quiet:
            print(
                f"round {rnd + 1:2d}/{rounds}: global test accuracy {acc:6.1%} "
                f"({time.perf_counter() - start:4.1f} s)",
                flush=True,
            )
        return {"accuracy": acc}

    return FedAvgRecipe(
        initial=lambda: {k: v.numpy() for k, v in make_model(seed).state_dict().items()},
        script=train,
        config={"seed": seed},
        rounds=rounds,
        codec=codec,
        evaluate=evaluate,
        validation_key="accuracy",
    )


async def run(
    rounds: int = 15, codec: str = "tensors", quiet: bool = False, seed: int = 0
) -> float:
    """Train; returns the final global model's test accuracy."""
    _, x_test, _, y_test = load()
    start = time.perf_counter()
    final = await recipe(rounds, codec, quiet, seed).simulate(clients=SITES)
    acc = accuracy(final.params, x_test, y_test)
    if not quiet:
        best = final.meta["best"]
        print(
            f"final global model: {acc:.1%} test accuracy after {rounds} rounds on {SITES} "
            f"non-IID sites (best {best['accuracy']:.1%} at round {best['round'] + 1}; "
            f"codec {codec}; seed {seed}; {time.perf_counter() - start:.1f} s)"
        )
    return acc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--codec", default="tensors", help="tensors, fp16, bf16, q8, nf4 or fp4")
    p.add_argument("--seed", type=int, default=0, help="initial model and shuffles")
    args = p.parse_args()
    anyio.run(run, args.rounds, args.codec, False, args.seed)


if __name__ == "__main__":
    main()
