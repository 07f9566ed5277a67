"""Many processes, one recipe: torchrun, DDP and FSDP2, on one machine or many.

    torchrun --nproc_per_node 8 -m trulyopen pretrain recipe.yaml                  # one node
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \
             --rdzv_endpoint HOST:29500 -m trulyopen pretrain recipe.yaml         # each of two nodes

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything runs in one process. Every
rank takes micro-batches rank::world of each step (see train/loop.py), so the data a step sees does
not depend on the world size, and gradients are averaged over ranks:

    ddp   every rank holds the whole model; gradients are all-reduced (DistributedDataParallel)
    fsdp  parameters, gradients and optimizer state are sharded over ranks (FSDP2 `fully_shard`
          on each decoder layer, then on the whole model)

Checkpoints always hold full, unsharded state keyed by parameter name (torch's distributed
state-dict API), so a checkpoint written by N processes loads in one and the other way round.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init() -> World:
    """Join the process group when started by torchrun; otherwise a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), device)


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def mean(value: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of a scalar over ranks (for logging)."""
    if world.size == 1:
        return value
    value = value.detach().clone().to(world.device)
    dist.all_reduce(value, op=dist.ReduceOp.AVG if world.device.type == "cuda" else dist.ReduceOp.SUM)
    return value if world.device.type == "cuda" else value / world.size


def sum_stats(sums: dict[str, float], world: World) -> dict[str, float]:
    """Stats summed over this rank's micro-batches, summed over all ranks (every rank has the same keys)."""
    if world.size == 1:
        return sums
    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=world.device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return dict(zip(keys, values.tolist(), strict=True))


def blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder's blocks: the first ModuleList named `layers` (inside a peft wrapper too)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks"):
            return module
    raise ValueError(f"{type(model).__name__}: no list of decoder blocks found to shard")


def wrap(model: torch.nn.Module, strategy: str, world: World) -> torch.nn.Module:
    """The model as the training step sees it: itself, DDP, or FSDP2-sharded (in place)."""
    if world.size == 1:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.device.index] if world.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for layer in blocks(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def full_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainable_only: bool = False
) -> tuple[dict, dict]:
    """Unsharded model and optimizer state, keyed by parameter name, on the CPU (only the parameters
    that train, with `trainable_only`: an adapter's)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_state_dict(model, optimizer, options=options)


def load_full_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    model_sd: dict,
    optim_sd: dict,
    trainable_only: bool = False,
):
    """Load unsharded state into a (possibly sharded) model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_sd,
        optim_state_dict=optim_sd,
        options=StateDictOptions(full_state_dict=True, strict=not trainable_only),
    )
