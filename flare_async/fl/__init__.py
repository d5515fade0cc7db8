"""Federated learning on the fabric (layer L4): models, streaming aggregation, the server's
round API, workflows, the client runtime behind the Client API, and the simulator.

This is the face for people who run FL jobs and write workflows (see docs/design.md, "Public
faces"). What only the package itself uses (how a model is cut into wire parts, how a recipe is
loaded by name, FedBuff's staleness weight) stays in the private modules.
"""

from flare_async.fl._aggregate import RoundMismatch, WeightedSum, fedavg_step
from flare_async.fl._client import ClientRuntime
from flare_async.fl._edge import EdgeClient, EdgeStats
from flare_async.fl._fedbuff import FedBuffStats, fedbuff
from flare_async.fl._model import FLModel, ParamsType
from flare_async.fl._recipe import FedAvgRecipe
from flare_async.fl._relay import RelayAggregator
from flare_async.fl._secagg import SecAggError, SecAggRangeError
from flare_async.fl._secure import SecureAggregation, secure_round
from flare_async.fl._server import FLServer, RoundFailed, RoundResult
from flare_async.fl._simulator import simulate
from flare_async.fl._workflows import fedavg

__all__ = [
    "ClientRuntime",
    "EdgeClient",
    "EdgeStats",
    "FLModel",
    "FLServer",
    "FedBuffStats",
    "FedAvgRecipe",
    "ParamsType",
    "RelayAggregator",
    "RoundFailed",
    "RoundMismatch",
    "RoundResult",
    "SecAggError",
    "SecAggRangeError",
    "SecureAggregation",
    "WeightedSum",
    "fedavg",
    "fedavg_step",
    "fedbuff",
    "secure_round",
    "simulate",
]
