"""A round's updates kept one by one: what the rules that need them all at once work on.

FedAvg folds each result into one running sum as it arrives; robust aggregation (median,
Krum...) and cross-site evaluation need every site's result itself. :class:`Updates` keeps
them, in arrival order, in memory up to ``memory_bound`` bytes in all; past it each further
result goes to a file in the spill folder and is read back mapped (its pages are the kernel's
to drop: the server's resident memory stays bounded whatever the number of sites). A result
that arrived through a spill file already (8 MiB or more, see ``fl/_results.SPILL_AT``) stays
mapped from that file.

For a job's own process, :func:`pack` makes one model of all of them (``i:NAME`` tensors,
each update's other fields in the meta) and :func:`unpack` takes it apart again.
"""

from __future__ import annotations

import mmap
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from flare_async.codecs import decode, encode
from flare_async.errors import DecodeError
from flare_async.fl._aggregate import result_weight
from flare_async.fl._model import FLModel, ParamsType

MEMORY_BOUND = 1 << 30
"""Bytes of a round's updates kept in memory (beyond them, in spill files)."""
EACH_KEY = "flare.each"


class Updates:
    """Each site's result of one round, in arrival order (``sites[i]``'s is ``models[i]``)."""

    def __init__(self, spill: str | Path | None = None, memory_bound: int | None = None) -> None:
        self.folder = Path(spill) if spill is not None else Path(tempfile.gettempdir())
        self.memory_bound = MEMORY_BOUND if memory_bound is None else memory_bound
        self.sites: list[str] = []
        self.models: list[FLModel] = []
        self.in_memory = 0
        """Bytes of tensors held in memory (not mapped from a file)."""
        self.spilled = 0
        """Results written to spill files."""

    def __len__(self) -> int:
        return len(self.models)

    def __iter__(self) -> Iterator[tuple[str, FLModel]]:
        return iter(zip(self.sites, self.models, strict=True))

    def add(self, site: str, model: FLModel) -> None:
        """Keep ``site``'s result (mapped from a spill file if memory is spent).

        Raises:
            ValueError: its weight is not a finite number >= 0 (see ``result_weight``).
        """
        result_weight(model.meta)
        size = sum(_resident(np.asarray(v)) for v in model.params.values())
        if size and self.in_memory + size > self.memory_bound:
            model = self._spill(model)
        else:
            self.in_memory += size
        self.sites.append(site)
        self.models.append(model)

    def _spill(self, model: FLModel) -> FLModel:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"flare-update-{secrets.token_hex(8)}"
        try:
            with path.open("wb") as f:
                for part in encode({k: np.asarray(v) for k, v in model.params.items()}):
                    f.write(part)
            with path.open("rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        finally:
            path.unlink(missing_ok=True)  # the mapping keeps the file's pages until unmapped
        tensors, _ = decode(memoryview(mapped))
        self.spilled += 1
        return FLModel(
            params=dict(tensors),
            params_type=model.params_type,
            metrics=model.metrics,
            meta=model.meta,
            current_round=model.current_round,
            total_rounds=model.total_rounds,
        )

    def weights(self) -> list[float]:
        """Each result's weight (see ``result_weight``; checked when it was taken)."""
        return [result_weight(m.meta) for m in self.models]


def _resident(a: np.ndarray) -> int:
    """Bytes of ``a`` held in memory: 0 for a view of a mapped file."""
    base: Any = a
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, mmap.mmap):
        return 0
    if isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap):
        return 0
    return int(a.nbytes)


def pack(updates: Updates) -> FLModel:
    """All of ``updates`` as one model (tensor ``NAME`` of the i-th as ``i:NAME``)."""
    params: dict[str, Any] = {}
    each = []
    for i, (site, model) in enumerate(updates):
        for name, value in model.params.items():
            params[f"{i}:{name}"] = value
        each.append(
            {
                "site": site,
                "params_type": model.params_type.value,
                "names": list(model.params),
                "meta": model.meta,
                "metrics": model.metrics,
            }
        )
    return FLModel(params=params, meta={EACH_KEY: each})


def unpack(
    model: FLModel, spill: str | Path | None = None, memory_bound: int | None = None
) -> Updates:
    """The updates :func:`pack` packed.

    Raises:
        DecodeError: not a pack of updates.
    """
    out = Updates(spill, memory_bound)
    try:
        each = model.meta[EACH_KEY]
        for i, doc in enumerate(each):
            params = {str(n): model.params[f"{i}:{n}"] for n in doc["names"]}
            out.sites.append(str(doc["site"]))
            out.models.append(
                FLModel(
                    params=params,
                    params_type=ParamsType(doc["params_type"]),
                    meta=dict(doc["meta"]),
                    metrics={str(k): float(v) for k, v in dict(doc["metrics"]).items()},
                )
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise DecodeError(f"not a round's updates: {exc!r:.200}") from None
    return out


__all__ = ["MEMORY_BOUND", "Updates", "pack", "unpack"]
