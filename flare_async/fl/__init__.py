"""Federated learning on the fabric (layer L4): models, streaming aggregation, the server's
round API, workflows, the client runtime behind the Client API, the simulator, and the
deployed roles' services: the server's job service (:class:`JobManager`, with
:class:`AdminRights` and the admin protocol's channel :data:`JOB_CHANNEL`; a job's own code,
signed, :class:`JobCode`, made by :func:`pack_job`), a relay's
:class:`RelayAggregator`, a site's :class:`SiteJobs` under its :class:`SitePolicy`.

This is the face for people who run FL jobs and write workflows (see docs/design.md, "Public
faces"). What only the package itself uses (how a model is cut into wire parts, FedBuff's
staleness weight) stays in the private modules; other packages (the command line, the repo's
``cells/``) use only these names (a recipe by name: ``FedAvgRecipe.load``).
"""

from flare_async.fl._aggregate import RoundMismatch, WeightedSum, fedavg_step
from flare_async.fl._artifact import JobCode, is_own_code, pack_job
from flare_async.fl._client import ClientRuntime
from flare_async.fl._crosssite import cross_site_eval, render_matrix
from flare_async.fl._cyclic import cyclic
from flare_async.fl._edge import EdgeClient, EdgeStats
from flare_async.fl._fedbuff import FedBuffStats, fedbuff
from flare_async.fl._fedopt import ServerOptimizer
from flare_async.fl._jobs import CHANNEL as JOB_CHANNEL
from flare_async.fl._jobs import AdminRights, JobManager
from flare_async.fl._keys import (
    DITTO_LAMBDA,
    FEDPROX_MU,
    SCAFFOLD_CONTROL,
    SCAFFOLD_CTRL_DIFF,
    SCAFFOLD_CTRL_GLOBAL,
)
from flare_async.fl._model import FLModel, ParamsType
from flare_async.fl._privacy import SitePolicy, load_policy
from flare_async.fl._recipe import CyclicRecipe, FedAvgRecipe, SwarmRecipe
from flare_async.fl._relay import RelayAggregator
from flare_async.fl._robust import NotEnoughUpdates, RobustAggregation
from flare_async.fl._secagg import SecAggError, SecAggRangeError
from flare_async.fl._secure import SecureAggregation, secure_round
from flare_async.fl._server import FLServer, RoundFailed, RoundResult
from flare_async.fl._simulator import simulate
from flare_async.fl._site import SiteJobs
from flare_async.fl._strategies import Ditto, FedAvg, FedOpt, FedProx, Robust, Scaffold
from flare_async.fl._swarm import swarm
from flare_async.fl._workflows import fedavg

__all__ = [
    "AdminRights",
    "ClientRuntime",
    "CyclicRecipe",
    "DITTO_LAMBDA",
    "Ditto",
    "EdgeClient",
    "EdgeStats",
    "FEDPROX_MU",
    "FLModel",
    "FLServer",
    "FedAvg",
    "FedAvgRecipe",
    "FedBuffStats",
    "FedOpt",
    "FedProx",
    "JOB_CHANNEL",
    "JobCode",
    "JobManager",
    "NotEnoughUpdates",
    "ParamsType",
    "RelayAggregator",
    "Robust",
    "RobustAggregation",
    "RoundFailed",
    "RoundMismatch",
    "RoundResult",
    "SCAFFOLD_CONTROL",
    "SCAFFOLD_CTRL_DIFF",
    "SCAFFOLD_CTRL_GLOBAL",
    "Scaffold",
    "SecAggError",
    "SecAggRangeError",
    "SecureAggregation",
    "ServerOptimizer",
    "SiteJobs",
    "SwarmRecipe",
    "SitePolicy",
    "WeightedSum",
    "cross_site_eval",
    "cyclic",
    "fedavg",
    "fedavg_step",
    "fedbuff",
    "is_own_code",
    "load_policy",
    "pack_job",
    "render_matrix",
    "secure_round",
    "simulate",
    "swarm",
]
