"""hybridft: hybrid fine-tuning, zeroth-order on the base weights and first-order on a peft adapter."""

from hybridft.engine.directions import DirectionSampler, Directions
from hybridft.engine.estimators import FusedOneSided, FusedTwoSided, NormalizedProbes, OneSided, TwoSided
from hybridft.engine.fused import FusedAdaLomo, FusedSGD
from hybridft.engine.optim import HybridOptimizer
from hybridft.engine.rules import ZOSGD, replay_, update_
from hybridft.engine.sampler import ReshufflingSampler
from hybridft.engine.split import Partition, split
from hybridft.engine.storage import NearestRounding, StochasticRounding
from hybridft.engine.zo import ZOUpdate, direction, parameter_key, perturb_, projected_grad, step_seed

__version__ = "0.1.0"

__all__ = [
    "DirectionSampler",
    "Directions",
    "FusedAdaLomo",
    "FusedOneSided",
    "FusedSGD",
    "FusedTwoSided",
    "HybridOptimizer",
    "NearestRounding",
    "NormalizedProbes",
    "OneSided",
    "Partition",
    "ReshufflingSampler",
    "StochasticRounding",
    "TwoSided",
    "ZOSGD",
    "ZOUpdate",
    "direction",
    "parameter_key",
    "perturb_",
    "projected_grad",
    "replay_",
    "split",
    "step_seed",
    "update_",
]
