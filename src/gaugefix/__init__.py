"""gaugefix: the rescaling (gauge) symmetry of positively homogeneous PyTorch networks."""

import importlib

from gaugefix import step, zoo  # the training step's transformations; the example models
from gaugefix.action import apply_gauge_, random_gauge_
from gaugefix.balancing import BalanceResult, balance_
from gaugefix.coordinates import (
    GaugeCoordinates,
    SingularGramError,
    gauge_coordinates,
    generators_gram,
    project,
)
from gaugefix.diagnostics import (
    RelaxationRates,
    SharpnessResult,
    predicted_imbalance_change,
    relaxation_rates,
    sharpness,
)
from gaugefix.distributed import ShardingError
from gaugefix.equalize import EqualizeResult, equalize_
from gaugefix.errors import GaugefixError
from gaugefix.minimize import sharpness_objective
from gaugefix.moment import imbalance, imbalance_stats, imbalance_stats_tensor
from gaugefix.soft import OrbitSelectionPenalty, relax_
from gaugefix.structure import (
    Exclusion,
    GaugeStructure,
    TracingError,
    ValueDependentError,
    discover,
    register_rule,
    rules,
    unregister_rule,
)
from gaugefix.train import GaugeFixing
from gaugefix.verification import Verification, VerificationError, verify

__version__ = "0.1.0"

# Exceptions defined beside what raises them, resolved on first use (their modules load the
# checkpoint tools, the sweep engine or Ray's backend, which ``import gaugefix`` does not need).
_ERRORS_ELSEWHERE = {
    "CheckpointError": "gaugefix.checkpoint",
    "OutputError": "gaugefix.files",
    "StoreError": "gaugefix.experiments.store",
    "StoreBusy": "gaugefix.experiments.store",
    "TaskError": "gaugefix.experiments.tasks",
    "ClusterError": "gaugefix.experiments.ray_executor",
    "WorkerDied": "gaugefix.experiments.workers",
}


def __getattr__(name: str) -> type:
    if name in _ERRORS_ELSEWHERE:
        return getattr(importlib.import_module(_ERRORS_ELSEWHERE[name]), name)
    raise AttributeError(f"module 'gaugefix' has no attribute {name!r}")


__all__ = [
    "BalanceResult",
    "apply_gauge_",
    "balance_",
    "EqualizeResult",
    "equalize_",
    "sharpness_objective",
    "imbalance",
    "random_gauge_",
    "Exclusion",
    "GaugeStructure",
    "TracingError",
    "ValueDependentError",
    "__version__",
    "discover",
    "register_rule",
    "rules",
    "unregister_rule",
    "GaugeFixing",
    "OrbitSelectionPenalty",
    "imbalance_stats",
    "imbalance_stats_tensor",
    "relax_",
    "GaugeCoordinates",
    "GaugefixError",
    "SingularGramError",
    "ShardingError",
    *_ERRORS_ELSEWHERE,
    "RelaxationRates",
    "SharpnessResult",
    "gauge_coordinates",
    "generators_gram",
    "predicted_imbalance_change",
    "project",
    "relaxation_rates",
    "sharpness",
    "step",
    "Verification",
    "VerificationError",
    "verify",
    "zoo",
]
