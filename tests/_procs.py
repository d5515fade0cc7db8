"""Cell processes for the deployment tests: ``python -m flare_async run KIT`` with its event
lines (JSON on stdout) read by a thread, so tests wait for events instead of sleeping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from queue import Empty, Queue
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class Proc:
    """One cell process; its stdout events are read by a thread into a queue."""

    def __init__(
        self,
        name: str,
        kit: Path,
        log: Path,
        extra: list[str],
        prefix: Sequence[str] = (),
        *,
        cwd: Path | None = None,
        repo_on_path: bool = True,
    ) -> None:
        self.name = name
        self.kit = kit
        self.log = log
        self.extra = extra
        self.prefix = list(prefix)  # e.g. ``ip netns exec NS``: where the process runs
        self.cwd = cwd  # where it runs (default: here)
        self.repo_on_path = repo_on_path  # the repo's folder on PYTHONPATH (else: only what
        # the environment installed, as on a site that never saw the repo)
        self.events: Queue[dict[str, Any]] = Queue()
        self.proc = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if not self.repo_on_path:
            del env["PYTHONPATH"]
        with self.log.open("ab") as err:
            proc = subprocess.Popen(
                [
                    *self.prefix,
                    sys.executable,
                    "-m",
                    "flare_async",
                    "run",
                    str(self.kit),
                    "--handshake-timeout",
                    "1",
                    *self.extra,
                ],
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.cwd,
            )
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()
        return proc

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        with proc.stdout:
            for line in proc.stdout:
                try:
                    self.events.put(json.loads(line))
                except ValueError:
                    continue  # a line some user code printed: not an event

    def restart(self) -> None:
        self.proc = self._start()

    def wait_for(self, event: str, timeout: float = 30, **match: str) -> dict[str, Any]:
        """The next event of that kind (and fields); earlier other events are dropped."""
        while True:
            try:
                ev = self.events.get(timeout=timeout)
            except Empty:
                raise AssertionError(
                    f"{self.name}: no {event} {match} within {timeout} s; "
                    f"log:\n{self.log.read_text()[-3000:]}"
                ) from None
            if ev["event"] == event and all(ev.get(k) == v for k, v in match.items()):
                return ev

    def wait_all(self, event: str, key: str, values: list[str], timeout: float = 30) -> None:
        """Events of that kind whose ``key`` takes each of ``values``, in any order."""
        missing = set(values)
        while missing:
            missing.discard(self.wait_for(event, timeout)[key])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)
