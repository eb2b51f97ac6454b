"""One job on several processes through PyTorch's own engine: process group, rank-0-only I/O, DDP / FSDP2
(`fully_shard`) wrapping, gradient-sync control and activation checkpointing.

    torchrun --standalone --nproc_per_node=2 -m gdn_exp.cli task=lm trainer.strategy=ddp

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE in every process; without them a job is one process and nothing
here communicates. All ranks build the same model from the same seed and step through the same global batch
indices; each rank trains on its slice of them (`Distributed.shard`), and rank 0 alone writes the run
directory, metrics and checkpoints.
"""
import atexit
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable import checkpoint as checkpoint_activations
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Distributed:
    """Where this process stands in the job. strategy: "none" (one process), "ddp" or "fsdp"."""

    rank: int
    world_size: int
    device: torch.device
    strategy: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch (its length is divisible by world_size)."""
        return items.chunk(self.world_size)[self.rank]

    def broadcast(self, value):
        """Rank 0's `value` (any picklable object) on every rank."""
        if self.world_size == 1:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """trainer.device as a torch.device; "auto" and "cuda" mean this process's GPU (LOCAL_RANK).
    ValueError (one line naming trainer.device) for anything but auto, cpu, cuda or cuda:N with a GPU N here."""
    index = str(name)[len("cuda:"):] if str(name).startswith("cuda:") else None
    if name not in ("auto", "cpu", "cuda") and not (index and index.isascii() and index.isdigit()):
        shown = name if name != "" else "''"
        raise ValueError(f"trainer.device={shown} must be auto, cpu, cuda or cuda:N (N: a GPU index)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={name} but CUDA is not available here")
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise ValueError(f"trainer.device={name} but this machine has {torch.cuda.device_count()} GPU(s): "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def resolve_strategy(strategy: str, world_size: int) -> str:
    if strategy == "auto":
        return "ddp" if world_size > 1 else "none"
    if strategy == "none" and world_size > 1:
        raise ValueError(f"trainer.strategy=none but torchrun started {world_size} processes; use ddp or fsdp")
    return str(strategy)


@contextmanager
def distributed_job(device_name: str, strategy: str):
    """Yields this process's `Distributed`, joining torchrun's process group (once per process; kept for the
    next job of a multirun, destroyed at exit). A single process with strategy=fsdp gets a one-rank group for
    the duration of the job."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    strategy = resolve_strategy(strategy, world_size)
    device = pick_device(device_name, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    own_group = False
    if not dist.is_initialized():
        if world_size > 1:
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
            atexit.register(dist.destroy_process_group)
        elif strategy == "fsdp":
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            own_group = True
    try:
        yield Distributed(rank=rank, world_size=world_size, device=device, strategy=strategy)
    finally:
        if own_group:
            dist.destroy_process_group()


def wrap_model(model: nn.Module, strategy: str, device: torch.device, activation_checkpointing: bool) -> nn.Module:
    """The module to train: `model` itself, DistributedDataParallel(model), or model sharded in place with
    FSDP2 (each block, then the root: embedding, final norm and head). Activation checkpointing recomputes
    each block's activations in the backward pass instead of storing them; it keeps parameter names."""
    if activation_checkpointing:
        for block in model.blocks:
            checkpoint_activations(block)
    if strategy == "ddp":
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy == "fsdp":
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The LanguageModel inside a DDP wrapper (FSDP2 shards in place: the module is the model)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def gradient_sync(model: nn.Module, enabled: bool):
    """Context for one micro-batch's backward: with enabled=False, gradients accumulate locally and are
    reduced across ranks only on the last micro-batch of the step."""
    if isinstance(model, DistributedDataParallel):
        return nullcontext() if enabled else model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    return nullcontext()


def is_sharded(model: nn.Module) -> bool:
    """True when FSDP holds the model's parameters as shards (DTensors)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a possibly sharded one (FSDP's clip_grad_norm_ returns a DTensor)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
