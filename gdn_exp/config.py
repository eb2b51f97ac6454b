"""Typed schemas for the Hydra config, registered in Hydra's ConfigStore.

With these schemas a wrong type (`trainer.lr=fast`) fails at composition with Hydra's own message, and so does a
string option (`kernel.mode=parallel`: Hydra lists chunk and recurrent); a misspelled key (`trainer.lrr=1`) is
caught just before, by `check_override_keys`, which names the group's keys. What a schema cannot say (a key added
with `+group.key=...`, a value out of range, checks across groups) `validate` checks at start-up, in one line.
"""
import dataclasses
import hashlib
import math
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

import tasks
from gdn_exp.data import TASKS, task_source
from gdn_exp.model import ModelConfig


class Choice(str, Enum):
    """A string option: Hydra refuses any other value at composition and lists the valid ones. A member is its
    value to the code (`Mode.chunk == "chunk"`, f-strings, JSON)."""

    def __str__(self):
        return self.value

    def __format__(self, spec):
        return format(self.value, spec)


class Mode(Choice):
    chunk = "chunk"
    recurrent = "recurrent"


class Backend(Choice):
    auto = "auto"
    triton = "triton"
    torch = "torch"


class Precision(Choice):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


def precision_used(precision: str, device_type: str) -> str:
    """trainer.precision as a run on `device_type` ("cpu", "cuda") trains: auto is bf16 on CUDA, fp32 elsewhere."""
    return ("bf16" if device_type == "cuda" else "fp32") if precision == "auto" else str(precision)


class Strategy(Choice):
    auto = "auto"
    none = "none"
    ddp = "ddp"
    fsdp = "fsdp"


class LoggerName(Choice):
    wandb = "wandb"
    none = "none"


class WandbMode(Choice):  # what `wandb.init` accepts
    offline = "offline"
    online = "online"
    disabled = "disabled"
    shared = "shared"
    dryrun = "dryrun"
    run = "run"


@dataclass
class KernelConfig:
    mode: Mode = Mode.chunk              # chunkwise parallel | step by step
    backend: Backend = Backend.auto      # auto: Triton on CUDA, PyTorch otherwise


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    batch_size: int = 32                  # global: split over the ranks and micro-batches
    grad_accum_steps: int = 1             # micro-batches per step on each rank
    lr: float = 3e-3
    min_lr_ratio: float = 0.1             # cosine decays to lr * min_lr_ratio
    lr_decay_steps: Optional[int] = None  # the cosine's length (null: max_steps); max_steps then only truncates
    warmup_steps: int = 50
    weight_decay: float = 0.1             # matrices only
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    log_interval: int = 10                # steps between train/* metrics
    eval_interval: int = 50               # steps between evaluations on the test split
    eval_batch_size: int = 256
    target_accuracy: Optional[float] = 0.99   # stop once test/accuracy and each test/accuracy@L reach it (null: never)
    checkpoint_interval: int = 50         # steps between checkpoints/latest.pt
    resume: Any = False                   # false | true (newest stopped run like it) | a run dir | a .pt (new run)
    skip_completed: bool = True           # skip a completed job (a sweep's: also one with its config under outputs/)
    device: str = "auto"                  # auto (cuda if present) | cpu | cuda | cuda:N
    precision: Precision = Precision.auto  # auto: bf16 autocast on CUDA, fp32 on CPU
    strategy: Strategy = Strategy.auto    # auto: ddp under torchrun, else none; fsdp: FSDP2
    activation_checkpointing: bool = False    # recompute each block's activations in the backward pass
    cuda_graph: bool = True               # replay each step from a CUDA graph (one CUDA device, fixed shapes)
    num_threads: Optional[int] = None     # torch CPU threads (null: auto, half the cores, 1-4: train/threads.py)
    progress: bool = True                 # rich progress bar


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.wandb
    project: str = "gdn-exp"
    mode: WandbMode = WandbMode.offline   # offline, online and disabled are the documented ones
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
    task_cache_dir: str = "outputs/cache/tasks"   # generated task splits (Arrow) and tokenized corpora (task=lm)


def dir_name(overrides: str, limit: int = 60, prefix: str = "") -> str:
    """A run or job directory's name: `prefix` (a run's time and model) and its override string
    (hydra.job.override_dirname), shell-safe (only letters, digits and ._,=+- ; the rest becomes -), at most
    `limit` characters (a longer one is cut and ends in a hash of the whole, so that two override strings never
    share a name); "defaults" when there are no overrides."""
    name = re.sub(r"[^A-Za-z0-9._,=+-]", "-", overrides) or "defaults"
    room = max(limit - len(prefix), 16)
    if len(name) > room:
        name = name[:room - 9] + "-" + hashlib.md5(overrides.encode()).hexdigest()[:8]
    return prefix + name


def flatten_config(tree: dict, prefix: str = "") -> dict:
    """{"model": {"d_model": 64}} -> {"model.d_model": 64}; lists stay values."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def register_configs() -> None:
    # ${floordiv:a,b} ties one size to another in a preset (copy_len = seq_len / 2 in the length grids)
    OmegaConf.register_new_resolver("floordiv", lambda a, b: int(a) // int(b), replace=True)
    OmegaConf.register_new_resolver("dir_name", dir_name, replace=True)  # conf/hydra/default.yaml
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for name, source in TASKS.items():
        cs.store(group="schema/task", name=name, node=source.schema)


def schema_of(group: str, cfg) -> type:
    """The dataclass that types config node `group` ("" is the root; task: the chosen task's)."""
    if group == "task":
        return task_source(cfg.task.name).schema
    return {"": Config, "model": ModelConfig, "kernel": KernelConfig, "trainer": TrainerConfig,
            "logger": LoggerConfig}[group]


def check_known_keys(cfg) -> None:
    """Hydra lets `+group.key=value` add a key to a typed node; a key its schema lacks would be ignored or
    crash deep in the run, so it is refused here."""
    for group in ("", "model", "task", "kernel", "trainer", "logger"):
        node = cfg[group] if group else cfg
        known = [f.name for f in dataclasses.fields(schema_of(group, cfg))]
        for key in node:
            if key not in known and not (group == "" and key == "hydra"):
                path = f"{group}.{key}" if group else key
                value = OmegaConf.select(node, str(key), throw_on_resolution_failure=False)
                raise ValueError(f"+{path}={value} adds a key that {group or 'the top level'} does not have; "
                                 f"known keys: {', '.join(known)}")


def check_override_keys(overrides: list, config_groups: list) -> None:
    """Hydra's message for a misspelled key (`trainer.lrr=1`) suggests adding it with `+` and lists no valid keys;
    this check runs first and says, in one line, which keys the group has. Checked: `group.key=value` overrides
    of the typed groups (a task key against every task's keys: the chosen task may come from a preset) and
    top-level names (a key, or one of `config_groups` to choose from: `seed=1`, `model=small`); Hydra checks
    the rest."""
    import difflib

    groups = {"model": ModelConfig, "kernel": KernelConfig, "trainer": TrainerConfig, "logger": LoggerConfig}
    for override in overrides:
        if override.startswith(("-", "+", "~")) or "=" not in override:
            continue
        path = override.split("=")[0]
        if "." not in path:
            group, key = "", path.split("/")[0]  # hydra/launcher=local chooses within the hydra group
            known = list(dict.fromkeys([f.name for f in dataclasses.fields(Config)] + list(config_groups)))
        elif path.split(".")[0] == "task":
            group, key = path.split(".")[:2]
            known = list(dict.fromkeys(f.name for source in TASKS.values()
                                       for f in dataclasses.fields(source.schema)))
        elif path.split(".")[0] in groups:
            group, key = path.split(".")[:2]
            known = [f.name for f in dataclasses.fields(groups[group])]
        else:
            continue
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {group + '.' if group else ''}{close[0]}?)" if close else ""
            where = f"a key of {group}{hint}; its keys" if group else f"a top-level key or group{hint}; those are"
            raise ValueError(f"{path} is not {where}: {', '.join(known)}")


def check_range(key: str, value, *, low=None, high=None, low_open=False, high_open=False,
                allow_none=False) -> None:
    """ValueError `<key>=<value> must be ...` unless low <(=) value <(=) high; NaN never passes, and an open
    bound of ±inf means "finite"."""
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if high == math.inf:
            rule = f"a finite number {'>' if low_open else '>='} {low}"
        elif low is not None and high is not None:
            rule = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        elif low is not None:
            rule = f"{'>' if low_open else '>='} {low}"
        else:
            rule = f"{'<' if high_open else '<='} {high}"
        raise ValueError(f"{key}={value} must be {rule}" + (" or null" if allow_none else ""))


def check_trainer(trainer) -> None:
    """Every TrainerConfig field that can hold an impossible value (device and strategy: at
    `distributed_job`, which picks them before this runs)."""
    for key in ("max_steps", "batch_size", "grad_accum_steps", "eval_interval", "log_interval",
                "checkpoint_interval", "eval_batch_size"):
        check_range(f"trainer.{key}", trainer[key], low=1)
    check_range("trainer.lr", trainer.lr, low=0, low_open=True, high=math.inf, high_open=True)
    check_range("trainer.min_lr_ratio", trainer.min_lr_ratio, low=0, high=1)
    check_range("trainer.warmup_steps", trainer.warmup_steps, low=0)
    check_range("trainer.lr_decay_steps", trainer.lr_decay_steps, low=1, allow_none=True)
    check_range("trainer.weight_decay", trainer.weight_decay, low=0, high=math.inf, high_open=True)
    betas = list(trainer.betas)
    if len(betas) != 2:
        raise ValueError(f"trainer.betas={betas} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    for i, beta in enumerate(betas):
        check_range(f"trainer.betas[{i}]", beta, low=0, high=1, high_open=True)
    check_range("trainer.grad_clip", trainer.grad_clip, low=0, low_open=True)  # inf: no clipping
    check_range("trainer.target_accuracy", trainer.target_accuracy, low=0, high=1, allow_none=True)
    check_range("trainer.num_threads", trainer.num_threads, low=1, allow_none=True)
    resume = trainer.resume
    if not (resume is None or isinstance(resume, bool) or (isinstance(resume, str) and resume.strip())):
        raise ValueError(f"trainer.resume={resume if resume != '' else repr(resume)} must be false, true or "
                         f"the path of a run directory or checkpoint")


def validate(cfg) -> None:
    """Start-up checks of the keys and values of every group; raises a one-line ValueError naming the key
    and what it may be."""
    check_known_keys(cfg)
    check_trainer(cfg.trainer)
    check_range("seed", cfg.seed, low=0, high=tasks.SEEDS_PER_SPLIT, high_open=True)
    if not str(cfg.task_cache_dir).strip():
        raise ValueError("task_cache_dir='' must be a directory path")
    task_source(cfg.task.name).check(cfg.task)
    ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True)).validate()
    if cfg.model.position_embedding == "learned" and cfg.model.max_positions < cfg.task.get("seq_len", 0):
        raise ValueError(f"model.max_positions={cfg.model.max_positions} is shorter than task.seq_len="
                         f"{cfg.task.seq_len}")
    if cfg.model.vocab_size < cfg.task.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than task.vocab_size="
                         f"{cfg.task.vocab_size}")


def validate_batch_split(trainer_cfg, world_size: int) -> None:
    """The global batch must split evenly over ranks and micro-batches."""
    per_step = world_size * trainer_cfg.grad_accum_steps
    if trainer_cfg.batch_size % per_step != 0:
        raise ValueError(f"trainer.batch_size={trainer_cfg.batch_size} must be divisible by the number of ranks "
                         f"({world_size}) times trainer.grad_accum_steps ({trainer_cfg.grad_accum_steps})")
