"""Where training runs: the device (`--device auto|cpu|cuda`) and several processes (torch.distributed).

Several processes are launched by torchrun (one per GPU, or a few per CPU machine), each with the
same data and arguments.  Rank 0 initialises the model and the others receive it; every process
then searches the codes of its share of each chunk (the expensive part), and DDP averages the
gradients, so the optimizer steps are those of one process with the whole batch.  No gradient
synchronisation of our own: only the decisions (stop, validation MSE) are reduced here.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """auto: CUDA where torch sees a GPU, else the CPU.  Under torchrun, `cuda` is this process's GPU."""
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if kind == "auto":
        kind = name = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device cuda: torch sees no CUDA device here (no GPU, or a CPU build of torch)")
        if name == "cuda":
            name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return torch.device(name)


def init_from_env(device: torch.device) -> None:
    """Join the process group that torchrun describes (WORLD_SIZE > 1): NCCL on CUDA, gloo on the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # Rank 0 initialises alone (k-means, RQ, LSQ++) while the others wait: a long timeout.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=3))


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(n: int) -> slice:
    """This process's equal share of n items (the last n % world are left out)."""
    rank, world = rank_world()
    size = n // world
    return slice(rank * size, (rank + 1) * size)


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model as DDP sees it when several processes train (gradients averaged in backward)."""
    if rank_world()[1] == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False)  # buffers (mean, centroids) never change


def broadcast_state(model: torch.nn.Module, obj, device: torch.device):
    """Rank 0's `obj`, and its weights and buffers into every process's model (through `device`:
    NCCL sends GPU tensors only).  An exception as `obj` is raised in every process."""
    if rank_world()[1] == 1:
        return obj
    box = [obj, {name: tuple(t.shape) for name, t in model.state_dict().items()}]
    dist.broadcast_object_list(box, 0)
    if isinstance(box[0], BaseException):
        raise RuntimeError(f"rank 0 failed to initialise: {box[0]}") from box[0]
    for name, tensor in model.state_dict().items():
        if tuple(tensor.shape) != box[1][name]:  # a buffer rank 0 resized (the seed codebooks)
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, tensor.new_zeros(box[1][name]))
    for tensor in model.state_dict().values():
        on_device = tensor.to(device)
        dist.broadcast(on_device, 0)
        tensor.copy_(on_device)
    return box[0]


def sum_all(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over the processes."""
    if rank_world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_process(flag: bool, device: torch.device) -> bool:
    return sum_all([float(flag)], device)[0] > 0


def mean_all(values: list[float], device: torch.device) -> list[float]:
    """Element-wise means over the processes: one clock (elapsed time) for every process's schedule."""
    return [v / rank_world()[1] for v in sum_all(values, device)]


def sum_tensor(t: torch.Tensor) -> torch.Tensor:
    if rank_world()[1] > 1:
        dist.all_reduce(t)
    return t


def broadcast_tensor(t: torch.Tensor) -> torch.Tensor:
    if rank_world()[1] > 1:
        dist.broadcast(t, 0)
    return t
