"""``flare-async simulate MODULE:RECIPE --clients N``: run a job in the simulator, printing each
round's progress and metrics as it finishes (JSON lines; other lines are the training scripts'
own output). A recipe whose script is ``"MODULE:FUNCTION"`` runs each site's script in its own
process."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import anyio

from flare_async import _logging
from flare_async.errors import FlareError
from flare_async.fl import FedAvgRecipe, RoundResult


def add_parser(sub: Any) -> None:
    p = sub.add_parser("simulate", help="run a job in the simulator (one process)")
    p.add_argument("recipe", help="MODULE:NAME of a FedAvgRecipe (or a function returning one)")
    p.add_argument("--clients", type=int, default=2, help="simulated sites (default 2)")
    p.add_argument("--relays", type=int, default=0, help="relays aggregating their sites")
    p.add_argument("--rounds", type=int, default=None, help="override the recipe's rounds")
    p.add_argument("--codec", default=None, help="override how models travel (q8, nf4...)")
    p.add_argument(
        "--processes",
        action="store_true",
        help="run each site as its own process connected over tcp (the script must be "
        "importable by name)",
    )


def run(args: Any) -> int:
    _logging.configure(json=False, level=30)
    try:
        recipe = FedAvgRecipe.load(args.recipe)
        if args.rounds is not None:
            recipe.rounds = args.rounds
        if args.codec is not None:
            recipe.codec = args.codec
        start = time.monotonic()

        def progress(result: RoundResult) -> None:
            line = {
                "event": "round",
                "round": result.round + 1,
                "of": recipe.rounds,
                "responded": len(result.responded),
                "failed": sorted(result.failed),
                "metrics": result.mean_metrics(),
                "seconds": round(time.monotonic() - start, 3),
            }
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()

        final = anyio.run(
            lambda: recipe.simulate(
                args.clients, relays=args.relays, on_round=progress, processes=args.processes
            ),
            backend_options={"use_uvloop": True},
        )
    except (FlareError, ValueError) as exc:
        sys.stderr.write(f"flare-async simulate: {type(exc).__name__}: {exc}\n")
        return 1
    done = {
        "event": "done",
        "seconds": round(time.monotonic() - start, 3),
        "metrics": final.metrics,
        "best": final.meta.get("best"),
    }
    sys.stdout.write(json.dumps(done) + "\n")
    return 0
