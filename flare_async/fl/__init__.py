"""Federated learning on the fabric (layer L4): models, streaming aggregation, the server's
round API, workflows, the client runtime behind the Client API, and the simulator."""

from flare_async.fl._aggregate import RoundMismatch, WeightedSum, fedavg_step
from flare_async.fl._client import ClientRuntime
from flare_async.fl._edge import EdgeClient, EdgeStats
from flare_async.fl._fedbuff import FedBuffStats, fedbuff, staleness_weight
from flare_async.fl._model import FLModel, ParamsType, model_from_parts, model_parts
from flare_async.fl._recipe import FedAvgRecipe, load_recipe, script_spec
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
    "load_recipe",
    "model_from_parts",
    "model_parts",
    "script_spec",
    "secure_round",
    "simulate",
    "staleness_weight",
]
