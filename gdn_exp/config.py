"""Typed schemas for the Hydra config, registered in Hydra's ConfigStore.

With these schemas a misspelled key (`trainer.lrr=1`) or a wrong type (`trainer.lr=fast`) fails at
composition with Hydra's own message. Cross-field checks that need several groups live in `validate`.
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

import tasks
from gdn_exp.data import LMTaskConfig
from gdn_exp.model import ModelConfig


@dataclass
class KernelConfig:
    mode: str = "chunk"      # chunk (chunkwise parallel) | recurrent (step by step)
    backend: str = "auto"    # auto (Triton on CUDA, PyTorch otherwise) | triton | torch


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    batch_size: int = 32                  # global: split over the ranks and micro-batches
    grad_accum_steps: int = 1             # micro-batches per step on each rank
    lr: float = 3e-3
    min_lr_ratio: float = 0.1             # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1             # matrices only
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    log_interval: int = 10                # steps between train/* metrics
    eval_interval: int = 50               # steps between evaluations on the test split
    eval_batch_size: int = 256
    target_accuracy: Optional[float] = 0.99   # stop early once test/accuracy reaches it (null: never)
    checkpoint_interval: int = 50         # steps between checkpoints/latest.pt
    resume: Any = False                   # false | true (latest matching run) | path to a run dir or .pt
    skip_completed: bool = True           # a job whose run dir already holds a completed results.json is skipped
    device: str = "auto"                  # auto (cuda if present) | cpu | cuda | cuda:N
    precision: str = "auto"               # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    strategy: str = "auto"                # auto (ddp under torchrun, else none) | none | ddp | fsdp (FSDP2)
    activation_checkpointing: bool = False    # recompute each block's activations in the backward pass
    cuda_graph: bool = True               # replay each step from a CUDA graph (one CUDA device, fixed shapes)
    num_threads: Optional[int] = None     # torch CPU threads (null: torch's default)
    progress: bool = True                 # rich progress bar


@dataclass
class LoggerConfig:
    name: str = "wandb"                   # wandb | none
    project: str = "gdn-exp"
    mode: str = "offline"                 # offline | online | disabled
    entity: Optional[str] = None
    group: Optional[str] = None           # null: the sweep directory's name in a multirun
    tags: List[str] = field(default_factory=list)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: Any = None                      # typed by the chosen task's schema (task/<name>.yaml)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    task_cache_dir: str = "outputs/cache/tasks"   # generated task splits (HF datasets, Arrow)


def task_schema(name: str) -> type:
    """A dataclass for `task/<name>.yaml`: the task's own parameters plus split sizes."""
    params = [(f.name, f.type, field(default=f.default)) for f in dataclasses.fields(tasks.config_class(name))]
    return dataclasses.make_dataclass(
        f"{name}_task",
        [("name", str, field(default=name)), ("num_train", int, field(default=10_000)),
         ("num_test", int, field(default=1_000))] + params)


def register_configs() -> None:
    # ${floordiv:a,b} ties one size to another in a preset (copy_len = seq_len / 2 in the length grids)
    OmegaConf.register_new_resolver("floordiv", lambda a, b: int(a) // int(b), replace=True)
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for name in tasks.TASKS:
        cs.store(group="schema/task", name=name, node=task_schema(name))
    cs.store(group="schema/task", name="lm", node=LMTaskConfig)


def task_params(task_cfg) -> dict:
    """The generator's keyword arguments from a composed `task` node (drops name and split sizes)."""
    return {k: v for k, v in task_cfg.items() if k not in ("name", "num_train", "num_test")}


def validate(cfg) -> None:
    """Cross-group checks at start-up; raises ValueError naming the key and value to change."""
    if cfg.kernel.mode not in ("chunk", "recurrent"):
        raise ValueError(f"kernel.mode={cfg.kernel.mode} must be chunk or recurrent")
    if cfg.kernel.backend not in ("auto", "triton", "torch"):
        raise ValueError(f"kernel.backend={cfg.kernel.backend} must be auto, triton or torch")
    if cfg.trainer.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"trainer.precision={cfg.trainer.precision} must be auto, fp32 or bf16")
    if cfg.logger.name not in ("wandb", "none"):
        raise ValueError(f"logger.name={cfg.logger.name} must be wandb or none")
    if cfg.model.vocab_size < cfg.task.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than task.vocab_size="
                         f"{cfg.task.vocab_size}")
    for key in ("max_steps", "batch_size", "grad_accum_steps", "eval_interval", "log_interval",
                "checkpoint_interval"):
        if cfg.trainer[key] <= 0:
            raise ValueError(f"trainer.{key}={cfg.trainer[key]} must be positive")


def validate_batch_split(trainer_cfg, world_size: int) -> None:
    """The global batch must split evenly over ranks and micro-batches."""
    per_step = world_size * trainer_cfg.grad_accum_steps
    if trainer_cfg.batch_size % per_step != 0:
        raise ValueError(f"trainer.batch_size={trainer_cfg.batch_size} must be divisible by the number of ranks "
                         f"({world_size}) times trainer.grad_accum_steps ({trainer_cfg.grad_accum_steps})")
