"""Cross-site evaluation: every site's model, and the global one, scored on every site's data.

Two kinds of task, FLARE's names, which the Client API's ``is_submit_model()`` and
``is_evaluate()`` tell apart:

1. ``submit_model`` to every site (the task carries the global model): each answers with its
   own model (FULL, or a DIFF against the global one). A site that fails it is left out of the
   models evaluated, and said so.
2. ``validate``, once per model (the global one first, then each site's, in the order of the
   job's sites): every site scores it on its own data and answers with metrics only.

The report is a matrix, ``metrics[model][site]``: ``model`` is ``"global"`` or the site whose
model it is. Each model's task carries its owner in ``meta["model_owner"]``. No site's model
reaches another site through the server's disk: it is sent as the next task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flare_async.codecs import as_numpy
from flare_async.fl._aggregate import to_dtype
from flare_async.fl._checks import misfit
from flare_async.fl._model import FLModel, ParamsType
from flare_async.fl._results import RoundFailed
from flare_async.fl._server import Rounds

GLOBAL = "global"
OWNER_KEY = "model_owner"


async def cross_site_eval(
    server: Rounds,
    global_params: Mapping[str, Any] | None = None,
    *,
    sites: Sequence[str] | None = None,
    deadline: float = 60.0,
    submit: bool = True,
) -> dict[str, Any]:
    """Evaluate the global model (if given) and, with ``submit``, every site's own model, on
    every site in ``sites`` (default: all the job's).

    Returns:
        ``{"models": [...], "sites": [...], "metrics": {model: {site: {name: value}}},
        "failed": {model: {site: why}}}``; ``failed[model]`` is ``{"submit_model": why}``
        for a site whose model never came.
    """
    who = list(sites) if sites is not None else list(server.clients)
    base = {k: np.asarray(as_numpy(v)) for k, v in (global_params or {}).items()}
    models: dict[str, dict[str, np.ndarray]] = {}
    failed: dict[str, dict[str, str]] = {}
    if base:
        models[GLOBAL] = base
    if submit:
        task = FLModel(params=base)
        got = await server.run_round(
            task, who, task="submit_model", collect="each", min_responses=0, deadline=deadline
        )
        kept = dict(got.updates or ())
        for site in who:
            if site in kept and base and (why := misfit(base, kept[site])):
                failed[site] = {"submit_model": f"a model that does not fit: {why}"}
            elif site in kept:
                models[site] = _as_full(base, kept[site])
            else:
                why = got.failed.get(site, "no model")
                failed[site] = {"submit_model": why}
        del got, kept
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    for owner, params in models.items():
        task = FLModel(params=params, meta={OWNER_KEY: owner})
        try:
            scored = await server.run_round(
                task, who, task="validate", collect="each", min_responses=0, deadline=deadline
            )
        except RoundFailed as exc:  # min_responses=0: only a refused round lands here
            failed[owner] = dict(exc.failed)
            continue
        metrics[owner] = {s: dict(scored.metrics[s]) for s in who if s in scored.metrics}
        if scored.failed:
            failed.setdefault(owner, {}).update(scored.failed)
    return {"models": list(models), "sites": who, "metrics": metrics, "failed": failed}


def _as_full(base: Mapping[str, np.ndarray], model: FLModel) -> dict[str, np.ndarray]:
    """A submitted model as whole weights (a DIFF is added to the global model)."""
    params = {k: np.asarray(v) for k, v in model.params.items()}
    if model.params_type is not ParamsType.DIFF:
        return params
    out = dict(base)
    for name, delta in params.items():
        g = base.get(name)
        out[name] = delta if g is None else to_dtype(g + delta, g.dtype)
    return out


def render_matrix(report: Mapping[str, Any], metric: str | None = None) -> str:
    """The report as a text table: a row per model, a column per site, one metric (the first
    one reported, unless named)."""
    sites: list[str] = list(report.get("sites", []))
    rows: dict[str, dict[str, dict[str, float]]] = report.get("metrics", {})
    if metric is None:
        names = sorted({k for row in rows.values() for cell in row.values() for k in cell})
        if not names:
            return "(no metrics)"
        metric = names[0]
    short = [s.rsplit(".", 1)[-1] for s in sites]
    width = max([len(metric), *(len(m.rsplit(".", 1)[-1]) for m in rows)]) + 2
    lines = [metric.ljust(width) + "".join(s.rjust(12) for s in short)]
    for model, row in rows.items():
        cells = []
        for site in sites:
            value = row.get(site, {}).get(metric)
            cells.append(("-" if value is None else f"{value:.4g}").rjust(12))
        lines.append(model.rsplit(".", 1)[-1].ljust(width) + "".join(cells))
    return "\n".join(lines)


MAX_NAME = 256
MAX_ENTRIES = 10_000
WHY_MAX = 2000


def checked_report(doc: Any) -> dict[str, Any]:
    """A job's end report as a job process sent it (``{"cross_site": report}``), kept only
    where it is well formed: names as text (cut at 256 characters), values as finite
    numbers, at most 10,000 models, sites and cells each; anything else is dropped."""
    if not isinstance(doc, dict) or not isinstance(doc.get("cross_site"), dict):
        return {}
    cs = doc["cross_site"]

    def names(v: Any) -> list[str]:
        return (
            [s[:MAX_NAME] for s in v if isinstance(s, str)][:MAX_ENTRIES]
            if isinstance(v, list)
            else []
        )

    def table(v: Any, cell: Any) -> dict[str, Any]:
        if not isinstance(v, dict):
            return {}
        rows = list(v.items())[:MAX_ENTRIES]
        return {str(k)[:MAX_NAME]: cell(x) for k, x in rows}

    def numbers(v: Any) -> dict[str, float]:
        return {
            k: float(x)
            for k, x in table(v, lambda x: x).items()
            if type(x) in (int, float) and np.isfinite(x)
        }

    def words(v: Any) -> dict[str, str]:
        return {k: str(x)[:WHY_MAX] for k, x in table(v, lambda x: x).items()}

    return {
        "cross_site": {
            "models": names(cs.get("models")),
            "sites": names(cs.get("sites")),
            "metrics": table(cs.get("metrics"), lambda row: table(row, numbers)),
            "failed": table(cs.get("failed"), words),
        }
    }


__all__ = ["GLOBAL", "OWNER_KEY", "checked_report", "cross_site_eval", "render_matrix"]
