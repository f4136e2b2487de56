"""hybridft: hybrid fine-tuning, zeroth-order on the base weights and first-order on a peft adapter."""

from hybridft.engine.directions import Directions
from hybridft.engine.optim import HybridOptimizer
from hybridft.engine.sampler import ReshufflingSampler
from hybridft.engine.split import Partition, split
from hybridft.engine.zo import ZOUpdate, direction, parameter_key, perturb_, projected_grad, replay_, step_seed, update_

__version__ = "0.1.0"

__all__ = [
    "Directions",
    "HybridOptimizer",
    "Partition",
    "ReshufflingSampler",
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
