"""What the algorithms' server and client halves agree on: the keys a task carries.

A workflow puts them into the task it sends (an :class:`FLModel`'s ``meta``, or tensors beside
the model's); the client helpers of :mod:`flare_async.client.algorithms` read them. They are
part of the wire (docs/fl.md, "Algorithms"): a client written from the docs alone uses them.
"""

from __future__ import annotations

FEDPROX_MU = "fedprox_mu"
"""``meta[FEDPROX_MU]``: FedProx's proximal weight μ (a float >= 0), sent with every task."""

DITTO_LAMBDA = "ditto_lambda"
"""``meta[DITTO_LAMBDA]``: Ditto's weight λ (a float >= 0) pulling each site's personal model
towards the global one, sent with every task."""

SCAFFOLD_CONTROL = "scaffold.c/"
"""SCAFFOLD's control variates travel as tensors beside the model's: the server's control ``c``
for tensor ``NAME`` is the task's tensor ``SCAFFOLD_CONTROL + NAME`` (float32, ``NAME``'s
shape); a site's result carries its control's change ``Δc_i`` under the same names."""


SCAFFOLD_CTRL_GLOBAL = "scaffold_c_global"
"""NVIDIA FLARE's ``AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL``: where a script finds the task's
control variate (``model.meta``, by tensor name); the Client API moves it there from the
wire's ``scaffold.c/NAME`` tensors, so FLARE's SCAFFOLD scripts run unchanged."""
SCAFFOLD_CTRL_DIFF = "scaffold_c_diff"
"""NVIDIA FLARE's ``AlgorithmConstants.SCAFFOLD_CTRL_DIFF``: where a script puts its control's
change (``meta``, by tensor name); the Client API sends it as ``scaffold.c/NAME`` tensors."""

SWARM_PLAN = "swarm"
"""The task header that starts a swarm: its plan, JSON (``fl/_swarm.py``), signed with the
task."""

__all__ = [
    "DITTO_LAMBDA",
    "FEDPROX_MU",
    "SCAFFOLD_CONTROL",
    "SCAFFOLD_CTRL_DIFF",
    "SCAFFOLD_CTRL_GLOBAL",
    "SWARM_PLAN",
]
