"""What each rank of the spawned gloo group in test_distributed.py runs (module level, so that
torch.multiprocessing can spawn it; imports only torch and hybridft.run.distributed)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from hybridft.engine.fused import FusedSGD
from hybridft.run.distributed import DataParallel, World, shutdown


def identical(parallel: DataParallel, module: nn.Module) -> str:
    try:
        parallel.check_identical(module)
    except RuntimeError as error:
        return str(error)
    return "same"


def fused_step(rank: int, size: int, examples: int, scale: float) -> tuple[torch.Tensor, bool, dict[str, int]]:
    """One FusedSGD step (lr 1, weights 0) whose loss on rank r has gradient ``scale`` (r + 1) on
    every weight, through ``DataParallel.in_backward``: the weights after it, whether the ranks
    agreed to back-propagate, and the bytes sent."""
    layer = nn.Linear(3, 2, bias=False)
    nn.init.zeros_(layer.weight)
    parallel = DataParallel(World(rank, size), torch.device("cpu"), [layer.weight])
    optimizer = FusedSGD(layer.parameters(), lr=1.0)
    optimizer.sync = parallel.in_backward(examples)
    loss = (layer.weight * scale * (rank + 1)).sum()
    agreed = optimizer.may_backward(loss)
    if agreed:
        loss.backward()
    return layer.weight.detach().clone(), agreed, parallel.sent


def run(rank: int, size: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    torch.manual_seed(rank)
    other = nn.Linear(3, 2)
    layer.weight.grad = torch.full_like(layer.weight, float(rank + 1))  # rank r's gradient: r + 1
    parallel = DataParallel(World(rank, size), torch.device("cpu"), [layer.weight])
    examples = [3, 1][rank]  # unequal slices: the means are weighted 3:1
    scalars = parallel.reducer(examples)(torch.tensor([10.0 * (rank + 1), float(rank)], dtype=torch.float64))
    torch.manual_seed(100 + rank)
    own, gathered = torch.get_rng_state(), parallel.rng_states()["ranks"]
    torch.save({"rng_ok": [bool(torch.equal(g["cpu"], own)) for g in gathered], "grad": layer.weight.grad, "scalars": scalars, "sent": parallel.sent,
                "same": identical(parallel, layer), "different": identical(parallel, other),
                "fused": fused_step(rank, size, examples, 1.0),
                "fused_one_nan": fused_step(rank, size, examples, float("nan") if rank == 1 else 1.0)},
               f"{results}/{rank}.pt")
    shutdown()  # a barrier first: a rank that tore gloo down while its peer still used it aborted in CI
