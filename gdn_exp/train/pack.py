"""Training a pack: the jobs of a sweep whose models have the same shapes train as one `ModelPack` in one
process, and each stays a run of its own.

Every model keeps what its solo run (`train.loop.train`) has: its seed's initial weights and task data, its batch
order (`train.data.batch_indices`), its learning rate schedule (`loop.lr_schedule`), AdamW settings and gradient
clipping, and its run dir with the same files (config.yaml, metrics.jsonl, results.json, checkpoints/latest.pt
and best.pt in the solo format: a solo run resumes from them, `torch.load(weights_only=True)` reads them). Each
logs, evaluates, checkpoints and stops (max_steps, target_accuracy, divergence) on its own steps; a model that is
done is frozen and costs only its share of the pack's kernels. A stop signal checkpoints every model.

The step is `train.pack_step.PackStep`; evaluation and checkpoints go through one solo LanguageModel into which
the model's weights are copied, so they are the solo run's own code (`evaluate`, `checkpoint`).
"""
import json
import logging
import math
import time
import traceback
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from gdn_exp.data import task_source
from gdn_exp.model import LanguageModel, ModelConfig
from gdn_exp.pack import ModelPack
from gdn_exp.train import USER_ERRORS, check_config, decision_of, write_results
from gdn_exp.train import checkpoint
from gdn_exp.train.data import BatchIndices, device_splits
from gdn_exp.train.distributed import Distributed, distributed_job
from gdn_exp.train.evaluate import evaluate_splits, reached_target
from gdn_exp.train.loggers import RunLogger, finish_crashed_run
from gdn_exp.train.loop import StopRequest, lr_schedule, new_counters, prepare_process, write_config
from gdn_exp.train.pack_step import PackSplit, PackStep, StackedAdamW

log = logging.getLogger(__name__)

ADAMW_EPS = 1e-8  # torch.optim.AdamW's default, which the solo run uses


@dataclass
class Member:
    """One model of a pack: its job and where its run stands."""

    cfg: Any
    run_dir: Path
    config: dict                                 # the resolved config, as the solo run writes it
    splits: dict
    indices: BatchIndices
    counters: dict = field(default_factory=new_counters)
    earlier_s: float = 0.0                       # wall time of the run's earlier segments (a resume)
    logger: Any = None
    resume_path: Optional[Path] = None
    status: str = "completed"
    error: Optional[str] = None
    metrics: dict = field(default_factory=dict)
    loss_value: float = float("nan")
    last_eval_step: int = -1
    log_time: float = 0.0
    log_steps: int = 0
    done: bool = False

    def lr(self, step: int) -> float:
        """The learning rate of `step`, as the solo run's LambdaLR gives it."""
        return self.cfg.trainer.lr * lr_schedule(self.cfg.trainer)(step)


def run_pack(cfgs: list, run_dirs: list, *, skip_completed: bool = True) -> list:
    """`train.run_job` for the jobs of a pack: skips the completed ones and refuses what `resume.decide` refuses
    (as run_job does), checks each config, trains the rest as one
    pack and writes every run dir's results.json; returns each job's results dict. Never raises for a failed run:
    a config error fails only its job; a crash of the pack fails every job still in it."""
    results = [None] * len(cfgs)
    todo = []
    with distributed_job(cfgs[0].trainer.device, "none") as dist_info:
        for i, (cfg, run_dir) in enumerate(zip(cfgs, run_dirs)):
            decided = decision_of(cfg, run_dir, skip_completed)  # skipped or refused: nothing written
            if decided is not None:
                results[i] = decided
                continue
            try:
                check_config(cfg, dist_info)
                todo.append(i)
            except USER_ERRORS as e:
                results[i] = write_results(run_dir, {"status": "failed", "error": str(e), "user_error": True})
        if todo:
            try:
                trained = train_pack([cfgs[i] for i in todo], [run_dirs[i] for i in todo], dist_info)
            except USER_ERRORS as e:
                trained = [{"status": "failed", "error": str(e), "user_error": True}] * len(todo)
            except Exception as e:  # a bug or a crash: every job of the pack fails with the traceback
                log.exception("pack failed")
                finish_crashed_run()
                trained = [{"status": "failed", "error": f"{type(e).__name__}: {e}", "user_error": False,
                            "traceback": traceback.format_exc()}] * len(todo)
            for i, r in zip(todo, trained):
                results[i] = write_results(run_dirs[i], r)
    return results


def train_pack(cfgs: list, run_dirs: list, dist_info: Distributed) -> list:
    """Trains the jobs `cfgs` (models of one shape; the trainer keys that shape the step — batch_size,
    grad_accum_steps, precision, cuda_graph — equal) as one pack; returns each job's results dict."""
    return PackTrainer(cfgs, run_dirs, dist_info).run()


class PackTrainer:
    """`train_pack`'s state: the pack, its step, the solo model that evaluation and checkpoints go through, and
    the members."""

    def __init__(self, cfgs: list, run_dirs: list, dist_info: Distributed):
        self.start = time.time()
        self.dist_info, self.device = dist_info, dist_info.device
        device = self.device
        tc = cfgs[0].trainer  # the keys every member shares
        self.autocast = prepare_process(tc, dist_info)
        self.members, models = [], []
        for cfg, run_dir in zip(cfgs, run_dirs):
            run_dir.mkdir(parents=True, exist_ok=True)
            config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
            write_config(run_dir, config, dist_info)
            splits = device_splits((json.dumps(config["task"], sort_keys=True), cfg.seed, cfg.task_cache_dir),
                                   partial(task_source(cfg.task.name).load, cfg), device)
            indices = BatchIndices(seed=cfg.seed, batch_size=tc.batch_size, num_examples=len(splits["train"]),
                                   device=device)
            self.members.append(Member(cfg, run_dir, config, splits, indices))
            torch.manual_seed(cfg.seed)  # the solo run's initial weights
            models.append(LanguageModel(ModelConfig(**config["model"]), mode=config["kernel"]["mode"],
                                        backend=config["kernel"]["backend"]).to(device))
        data = PackSplit([m.splits["train"] for m in self.members])
        self.tokens_per_step = tc.batch_size * data.input_ids.shape[-1]
        # solo: one model's weights at a time, for evaluation and checkpoints
        self.pack, self.solo = ModelPack(models), models[0]
        del models
        self.num_params = self.solo.num_params()
        self.graphed = tc.cuda_graph and device.type == "cuda"
        log.info("pack of %d models (%s, d_model %d, %d layers, %s parameters each) on %s%s", len(self.members),
                 self.solo.cfg.mixer, self.solo.cfg.d_model, self.solo.cfg.n_layers, f"{self.num_params:,}",
                 device, ", CUDA graph" if self.graphed else "")
        trainers = [m.cfg.trainer for m in self.members]
        self.optimizer = StackedAdamW(self.pack, betas=[list(t.betas) for t in trainers],
                                      eps=[ADAMW_EPS] * len(trainers), weight_decay=[t.weight_decay for t in trainers])
        for i, m in enumerate(self.members):
            self.resume(i, m)
        self.step = PackStep(self.pack, self.optimizer, data, batch_size=tc.batch_size,
                             grad_accum_steps=tc.grad_accum_steps, grad_clip=[t.grad_clip for t in trainers],
                             autocast=self.autocast, cuda_graph=self.graphed,
                             window=min(t.log_interval for t in trainers))
        self.first_step_s = None

    def solo_optimizer(self, m: Member):
        """The solo run's AdamW (`train.loop.train`) over the solo model: checkpoints hold its state."""
        tc = m.cfg.trainer
        return torch.optim.AdamW(self.solo.param_groups(tc.weight_decay), lr=tc.lr, betas=tuple(tc.betas),
                                 fused=True, capturable=self.graphed)

    def resume(self, i: int, m: Member) -> None:
        """Model i from its checkpoint, where trainer.resume finds one (`checkpoint.find_resume`); its logger."""
        m.resume_path = checkpoint.find_resume(m.cfg.trainer.resume, m.run_dir, m.config)
        saved = None
        if m.resume_path:
            solo_optimizer = self.solo_optimizer(m)
            saved = checkpoint.load_latest(m.resume_path, self.solo, solo_optimizer)
            self.pack.copy_from(i, self.solo)
            self.optimizer.load(i, self.solo, solo_optimizer)
            m.counters.update(saved["counters"])
            m.earlier_s = m.counters["wall_time_s"]
            log.info("%s: resumed from %s at step %d", m.run_dir.name, m.resume_path, m.counters["step"])
        m.logger = RunLogger(m.run_dir, m.cfg.logger, m.config,
                             history=m.resume_path.parent.parent / "metrics.jsonl" if saved else None,
                             resume_step=m.counters["step"], history_rows=saved.get("metrics_rows") if saved else None,
                             wandb_id=saved.get("wandb_id") if saved else None)

    def save_latest(self, i: int, m: Member) -> None:
        """Model i's latest.pt, as its solo run writes it."""
        self.pack.copy_to(i, self.solo)
        solo_optimizer = self.solo_optimizer(m)
        step, lr = m.counters["step"], m.lr(m.counters["step"])  # the solo scheduler has set the next step's rate
        scheduler = torch.optim.lr_scheduler.LambdaLR(solo_optimizer, lambda _: 1.0).state_dict()
        scheduler.update(last_epoch=step, _step_count=step + 1, _last_lr=[lr] * len(solo_optimizer.param_groups))
        for group in solo_optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.export(i, self.solo, solo_optimizer)
        m.counters["wall_time_s"] = m.earlier_s + time.time() - self.start
        checkpoint.save_latest(m.run_dir / "checkpoints", self.solo, solo_optimizer, {
            "scheduler": scheduler, "counters": dict(m.counters), "rng": checkpoint.rng_state(),
            "config": m.config, "wandb_id": m.logger.wandb_id, "metrics_rows": m.logger.rows}, self.dist_info)

    def evaluate(self, i: int, m: Member) -> dict:
        """Model i's test metrics, logged; best.pt when its accuracy is the best so far."""
        self.pack.copy_to(i, self.solo)
        metrics = evaluate_splits(self.solo, m.splits, batch_size=m.cfg.trainer.eval_batch_size,
                                  autocast=self.autocast)
        if task_source(m.cfg.task.name).text:
            metrics["test/perplexity"] = math.exp(min(metrics["test/loss"], 700.0))
        m.logger.log(m.counters["step"], metrics)
        if m.counters["target_step"] is None and reached_target(metrics, m.cfg.trainer.target_accuracy):
            m.counters["target_step"] = m.counters["step"]
        if math.isfinite(metrics["test/loss"]) and metrics["test/accuracy"] > m.counters["best_accuracy"]:
            m.counters.update(best_accuracy=metrics["test/accuracy"], best_step=m.counters["step"])
            checkpoint.save(m.run_dir / "checkpoints" / "best.pt", {
                "model": self.solo.state_dict(), "counters": dict(m.counters), "metrics": metrics,
                "config": m.config})
        m.metrics, m.last_eval_step = metrics, m.counters["step"]
        return metrics

    def run(self) -> list:
        results = [None] * len(self.members)
        for i, m in enumerate(self.members):  # resumed at its end already
            if m.counters["step"] >= m.cfg.trainer.max_steps:
                results[i] = self.finish(i, m)
        dtype = self.pack.flat.dtype
        with StopRequest() as stop:
            window_start = time.perf_counter()
            while not all(m.done for m in self.members):
                indices = torch.stack([m.indices(m.counters["step"]) for m in self.members])   # [M, batch_size]
                lr = torch.tensor([0.0 if m.done else m.lr(m.counters["step"]) for m in self.members], dtype=dtype)
                self.step(indices, lr)
                if self.first_step_s is None:  # start-up, as the solo run reports it
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    self.first_step_s = time.time() - self.start
                stopping = stop.signal is not None
                due = stopping
                for m in self.members:
                    if not m.done:
                        m.counters["step"] += 1
                        m.counters["tokens_seen"] += self.tokens_per_step
                        m.log_steps += 1
                        step, t = m.counters["step"], m.cfg.trainer
                        due |= (step == t.max_steps or step % t.log_interval == 0 or step % t.eval_interval == 0
                                or step % t.checkpoint_interval == 0)
                if not due:
                    continue
                rows = self.step.read()  # [n, M, 2]
                elapsed = time.perf_counter() - window_start
                for i, m in enumerate(self.members):
                    if not m.done:
                        m.counters["train_time_s"] += elapsed
                        m.log_time += elapsed
                        if self.after_read(i, m, rows[:, i], stop.signal if stopping else None):
                            results[i] = self.finish(i, m)
                window_start = time.perf_counter()
        return results

    def after_read(self, i: int, m: Member, rows: torch.Tensor, stop_signal: Optional[str]) -> bool:
        """What the solo loop does after it reads its steps' rows [n, 2] (loss, gradient norm): divergence, log,
        evaluation and early stop, checkpoint, stop signal. Returns whether model i's run is over."""
        tc, step = m.cfg.trainer, m.counters["step"]
        nonfinite = (~torch.isfinite(rows)).any(1).nonzero()
        if len(nonfinite):  # its weights are those from before this step (PackStep.active)
            bad = int(nonfinite[0])
            m.counters["step"] = step - len(rows) + bad
            m.counters["tokens_seen"] -= (len(rows) - bad) * self.tokens_per_step
            column = 0 if not math.isfinite(rows[bad, 0]) else 1
            what, value = ("loss", "gradient norm")[column], float(rows[bad, column])
            m.status, m.error = "diverged", f"{what} became {value} at step {m.counters['step']}"
            return True
        m.loss_value, grad_norm = rows[-1].tolist()
        if step % tc.eval_interval == 0 or step == tc.max_steps:  # first, as the solo loop does
            self.evaluate(i, m)
        if step % tc.log_interval == 0 or step == tc.max_steps:
            tokens_per_s = m.log_steps * self.tokens_per_step / max(m.log_time, 1e-9)
            m.logger.log(step, {"train/loss": m.loss_value, "train/lr": m.lr(step - 1), "train/grad_norm": grad_norm,
                                "perf/tokens_per_s": tokens_per_s})
            m.log_time, m.log_steps = 0.0, 0
        if m.last_eval_step == step and reached_target(m.metrics, tc.target_accuracy):
            log.info("%s: test/accuracy %.4f >= target %.4f at step %d (and at every test length): stopping early",
                     m.run_dir.name, m.metrics["test/accuracy"], tc.target_accuracy, step)
            self.save_latest(i, m)
            return True
        if step % tc.checkpoint_interval == 0 or step == tc.max_steps:
            self.save_latest(i, m)
        if stop_signal:
            self.save_latest(i, m)
            m.status, m.error = "stopped", f"stopped by {stop_signal} at step {step}; resume with trainer.resume=true"
            return True
        return step >= tc.max_steps

    def finish(self, i: int, m: Member) -> dict:
        """Freezes model i in the pack and returns its results (the solo run's keys, plus pack_size)."""
        m.done = True
        self.step.active[i] = False
        if m.last_eval_step != m.counters["step"]:
            self.evaluate(i, m)
        c, device = m.counters, self.device
        results = {
            "status": m.status, **({"error": m.error} if m.error else {}), **m.metrics,
            "best/accuracy": c["best_accuracy"], "best/step": c["best_step"], "steps_to_target": c["target_step"],
            "steps": c["step"],
            "train/loss": m.loss_value, "num_params": self.num_params,
            "wall_time_s": m.earlier_s + time.time() - self.start,
            "first_step_s": self.first_step_s,
            "tokens_per_s": c["tokens_seen"] / max(c["train_time_s"], 1e-9),
            "steps_per_s": c["tokens_seen"] / self.tokens_per_step / max(c["train_time_s"], 1e-9),
            "cuda_graph": self.graphed,
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "world_size": 1, "strategy": "none", "resumed_from": str(m.resume_path) if m.resume_path else None,
            "pack_size": len(self.members),
        }
        if device.type == "cuda":
            results["mem/peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        m.logger.finish({k: v for k, v in results.items() if isinstance(v, (int, float, str))})
        return results
