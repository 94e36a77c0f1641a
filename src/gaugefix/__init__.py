"""gaugefix: the rescaling (gauge) symmetry of positively homogeneous PyTorch networks."""

from gaugefix import zoo  # the example models: gaugefix.zoo.GPT, ...
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
from gaugefix.equalize import EqualizeResult, equalize_, sharpness_objective
from gaugefix.errors import GaugefixError
from gaugefix.moment import imbalance, imbalance_stats
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

__version__ = "0.1.0"

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
    "relax_",
    "GaugeCoordinates",
    "GaugefixError",
    "SingularGramError",
    "ShardingError",
    "RelaxationRates",
    "SharpnessResult",
    "gauge_coordinates",
    "generators_gram",
    "predicted_imbalance_change",
    "project",
    "relaxation_rates",
    "sharpness",
    "zoo",
]
