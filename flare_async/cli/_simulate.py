"""``flare-async simulate RECIPE --clients N``: run a job in the simulator.

``RECIPE`` is ``MODULE:NAME`` (the current folder is on the import path, as with ``python
-m``) or ``path/to/file.py:NAME`` (the file is loaded as a module, its folder on the import
path so that its sibling imports work, and in the sites' processes too); ``NAME`` defaults to
``recipe``. It names a ``FedAvgRecipe`` or a function declared to return one; ``--rounds`` and
``--codec`` override the recipe's, and are passed to such a function too when it takes
parameters of those names (so what it prints agrees with what runs).

Progress, for a person, goes to stderr: on a terminal one bar (round k of n, sites that
answered of those asked, elapsed and remaining time, the latest metrics) with log lines above
it; elsewhere one plain line per round. Results go to stdout as JSON lines (one per round, then
``done``) with ``--json`` or when stdout is not a terminal; on a terminal a last summary line
instead. Other lines are the training scripts' own output. A recipe whose script is
``"MODULE:FUNCTION"`` runs each site's script in its own process. Ctrl-C stops the simulation:
one line, exit status 130 (a second Ctrl-C while it stops: at once).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import typing
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import Any, TextIO

import anyio
import numpy as np

from flare_async import _logging
from flare_async._spec import importable
from flare_async.cli._progress import (
    AboveBar,
    RoundProgress,
    _isatty,
    human_seconds,
    logging_above_bars,
    render_metrics,
)
from flare_async.cli._status import EXIT_INTERRUPTED
from flare_async.fl import FedAvgRecipe, FLModel, RoundResult


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="run a job in the simulator (one process)",
        description="Run a job in the simulator. RECIPE is MODULE:NAME or path/to/file.py:NAME "
        "(NAME defaults to recipe): a FedAvgRecipe, or a function declared to return one.",
    )
    p.add_argument("recipe", help="MODULE:NAME or path/to/file.py:NAME of a FedAvgRecipe")
    p.add_argument("--clients", type=_positive, default=2, help="simulated sites (default 2)")
    p.add_argument("--relays", type=int, default=0, help="relays aggregating their sites")
    p.add_argument("--rounds", type=_positive, default=None, help="override the recipe's rounds")
    p.add_argument("--codec", default=None, help="override how models travel (q8, nf4...)")
    p.add_argument(
        "--processes",
        action="store_true",
        help="run each site as its own process connected over tcp (the script must be "
        "importable by name)",
    )
    p.add_argument(
        "--backend",
        choices=("local", "ray"),
        default="local",
        help="local: this process (default); ray: the sites and relays in Ray actors "
        "(pip install 'flare_async[ray]')",
    )
    p.add_argument(
        "--actors",
        type=_positive,
        default=None,
        help="(ray) how many actors (default: one a subtree)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="(ray) the cluster to join, e.g. ray://head:10001 (default: a local Ray)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="JSON lines on stdout only (one per round, then done), no progress display "
        "(the default when stdout is not a terminal, progress then in plain lines on stderr)",
    )


def run(args: Any) -> int:
    debug = bool(getattr(args, "debug", False))
    logs = AboveBar(sys.stderr)
    _logging.configure(json=False, level=30, stream=typing.cast(TextIO, logs))
    overrides = {k: getattr(args, k) for k in ("rounds", "codec") if getattr(args, k) is not None}
    recipe = load_recipe(args.recipe, overrides)
    json_out = bool(args.json) or not _isatty(sys.stdout)
    with ExitStack() as stack:
        progress: RoundProgress | None = None
        if not args.json:
            progress = stack.enter_context(RoundProgress(recipe.rounds, out=sys.stderr))
            if progress.tty:
                stack.enter_context(logging_above_bars())
                if _isatty(sys.stdout):  # prints to the same terminal go above the bar too
                    stdout = sys.stdout
                    above = AboveBar(stdout, bars=sys.stderr)
                    sys.stdout = typing.cast(TextIO, above)
                    stack.callback(setattr, sys, "stdout", stdout)
                    stack.callback(above.close)  # first: a last partial line still goes out
        report = _Report(recipe, progress, json_out)
        interrupted: list[int] = []

        async def main() -> FLModel | None:
            final: FLModel | None = None
            with anyio.open_signal_receiver(signal.SIGINT) as signals:
                async with anyio.create_task_group() as tg:
                    running = anyio.CancelScope()

                    async def watch() -> None:
                        async for signo in signals:
                            if interrupted:  # a second Ctrl-C: stop now, not cleanly
                                sys.stderr.write("flare-async simulate: interrupted\n")
                                sys.stderr.flush()
                                sys.stdout.flush()  # the JSON lines written so far
                                os._exit(EXIT_INTERRUPTED)
                            interrupted.append(signo)
                            logs.muted = not debug  # the stop's own warnings say nothing new
                            running.cancel()

                    tg.start_soon(watch)
                    with running:
                        final = await recipe.simulate(
                            args.clients,
                            relays=args.relays,
                            on_round=report.on_round,
                            processes=args.processes,
                            backend=args.backend,
                            actors=args.actors,
                            ray_address=args.ray_address,
                        )
                    tg.cancel_scope.cancel()
            return final

        final = anyio.run(main, backend_options={"use_uvloop": True})
    if interrupted or final is None:
        raise KeyboardInterrupt  # the CLI's handler: "interrupted", exit status 130
    report.done(final)
    return 0


class _Report:
    """Each round as a JSON line (stdout) and on the progress display (stderr). A recipe that
    validates on the server reports its round once that is done, with its scores."""

    def __init__(self, recipe: FedAvgRecipe, progress: RoundProgress | None, json_out: bool):
        self.recipe = recipe
        self.progress = progress
        self.json_out = json_out
        self.start = time.monotonic()
        self.pending: RoundResult | None = None
        # on_round runs on the event loop, the wrapped evaluate in a worker thread: the hand
        # over of the pending round is one swap under this lock.
        self._lock = threading.Lock()
        if recipe.evaluate is not None:
            recipe.evaluate = self._evaluating(recipe.evaluate)

    def _take(self, new: RoundResult | None) -> RoundResult | None:
        with self._lock:
            pending, self.pending = self.pending, new
        return pending

    def on_round(self, result: RoundResult) -> None:
        if self.recipe.evaluate is None:
            self._emit(result, {})
            return
        unscored = self._take(result)
        if unscored is not None:  # its validation never came (the round was not used)
            self._emit(unscored, {})

    def _evaluating(
        self, evaluate: Callable[[int, dict[str, np.ndarray]], Mapping[str, float]]
    ) -> Callable[[int, dict[str, np.ndarray]], Mapping[str, float]]:
        def scored(rnd: int, params: dict[str, np.ndarray]) -> Mapping[str, float]:
            scores = evaluate(rnd, params)
            pending = self._take(None)
            if pending is not None:
                self._emit(pending, {str(k): float(v) for k, v in scores.items()})
            return scores

        return scored

    def _emit(self, result: RoundResult, validation: dict[str, float]) -> None:
        metrics = result.mean_metrics()
        seconds = time.monotonic() - self.start
        if self.json_out:
            line = {
                "event": "round",
                "round": result.round + 1,
                "of": self.recipe.rounds,
                "responded": len(result.responded),
                "failed": sorted(result.failed),
                "metrics": metrics,
                "validation": validation,
                "seconds": round(seconds, 3),
            }
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()
        if self.progress is not None:
            self.progress.update(
                result.round + 1,
                responded=len(result.responded),
                expected=len(result.responded) + len(result.failed),
                metrics={**validation, **metrics},
                failed=sorted(result.failed),
            )

    def done(self, final: FLModel) -> None:
        pending = self._take(None)
        if pending is not None:
            self._emit(pending, {})
        if self.progress is not None:
            self.progress.close()
        seconds = time.monotonic() - self.start
        best = final.meta.get("best")
        if self.json_out:
            done = {
                "event": "done",
                "seconds": round(seconds, 3),
                "metrics": final.metrics,
                "best": best,
            }
            sys.stdout.write(json.dumps(done) + "\n")
            sys.stdout.flush()
            return
        summary = f"done: {self.recipe.rounds} rounds in {human_seconds(seconds)}"
        if final.metrics:
            summary += "; " + render_metrics(final.metrics)
        if isinstance(best, dict) and "round" in best:
            scores = render_metrics({k: v for k, v in best.items() if k != "round"})
            summary += f"; best round {int(best['round']) + 1}" + (f" ({scores})" if scores else "")
        sys.stdout.write(summary + "\n")
        sys.stdout.flush()


def load_recipe(spec: str, overrides: Mapping[str, Any]) -> FedAvgRecipe:
    """The recipe ``spec`` names (``MODULE:NAME`` or ``path/to/file.py:NAME``, importable here
    and in the sites' processes) with ``overrides`` (see ``FedAvgRecipe.load``).

    Raises:
        ConfigError: a file that does not exist or load, a spec that does not name a recipe.
    """
    return FedAvgRecipe.load(importable(spec), overrides)
