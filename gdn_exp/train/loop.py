"""The training loop, top to bottom: data, model, optimizer, then step / log / evaluate / checkpoint.

One process or several (torchrun, see `gdn_exp.train.distributed`): every step draws the same global batch
indices on every rank, each rank trains on its share in trainer.grad_accum_steps micro-batches, and the loss
is normalised by the global number of scored tokens, so the update does not depend on the number of ranks.
"""
import logging
import math
import signal
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import tasks
from gdn_exp.config import task_params
from gdn_exp.data import PackedDocuments, load_lm_splits, make_tokenizer
from gdn_exp.loggers import RunLogger
from gdn_exp.model import LanguageModel, ModelConfig
from gdn_exp.train import checkpoint
from gdn_exp.train.distributed import Distributed, SilentLogger, full_value, gradient_sync, wrap_model
from gdn_exp.train.evaluate import IGNORE_INDEX, evaluate, lm_loss

log = logging.getLogger(__name__)


def lr_multiplier(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_lr_ratio at max_steps. A pure function of the step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def load_splits(cfg) -> dict:
    """{"train": ..., "test": ...} task tensors, generated (or, for task=lm, tokenized and packed) once per
    parameter set and cached on disk."""
    if cfg.task.name == "lm":
        return load_lm_splits(cfg.task, cache_dir=cfg.task_cache_dir)
    params = task_params(cfg.task)
    return {split: tasks.load_split(cfg.task.name, split=split, seed=cfg.seed, num_examples=size,
                                    cache_dir=cfg.task_cache_dir, **params)
            for split, size in (("train", cfg.task.num_train), ("test", cfg.task.num_test))}


def batch_indices(step: int, *, seed: int, batch_size: int, num_examples: int) -> torch.Tensor:
    """The examples of a training step: a pure function of (seed, step), so resuming needs only the step."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(num_examples, (batch_size,), generator=generator)


class StopRequest:
    """Turns SIGTERM / SIGINT into a flag the loop checks between steps, so a kill leaves a checkpoint."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg, run_dir: Path, dist_info: Distributed) -> dict:
    """Trains the configured model on the configured task; returns the results dict of results.json.

    Runs on every rank of a distributed job (`dist_info`); only rank 0 writes under run_dir.
    """
    start = time.time()
    tc = cfg.trainer
    device, is_main = dist_info.device, dist_info.is_main
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    use_bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext
    config = OmegaConf.to_container(cfg, resolve=True)

    if not is_main:  # rank 0 fills the data cache first, the others then read it
        dist_info.barrier()
    splits = load_splits(cfg)
    if is_main:
        dist_info.barrier()
    train_x, train_y = splits["train"]["input_ids"], splits["train"]["labels"]
    tokens_per_step = tc.batch_size * train_x.shape[1]

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model_cfg = ModelConfig(**config["model"])
    model = LanguageModel(model_cfg, mode=cfg.kernel.mode, backend=cfg.kernel.backend).to(device)
    num_params = model.num_params()
    log.info("model %s: %s parameters (%s without embeddings; %s mixer, kernel %s/%s) on %s x %d (%s)",
             model_cfg.name, f"{num_params:,}", f"{model.num_params(exclude_embeddings=True):,}", model_cfg.mixer,
             cfg.kernel.mode, cfg.kernel.backend, device.type, dist_info.world_size, dist_info.strategy)
    network = wrap_model(model, dist_info.strategy, device, tc.activation_checkpointing)
    # varlen: the model sees each batch as packed documents that never attend across a boundary
    forward = PackedDocuments(network, make_tokenizer(cfg.task.tokenizer).bos_id) if (
        cfg.task.name == "lm" and cfg.task.varlen) else network
    optimizer = torch.optim.AdamW(model.param_groups(tc.weight_decay), lr=tc.lr, betas=tuple(tc.betas),
                                  fused=device.type == "cuda" and dist_info.strategy != "fsdp")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_multiplier, warmup_steps=tc.warmup_steps, max_steps=tc.max_steps, min_lr_ratio=tc.min_lr_ratio))

    counters = {"step": 0, "best_accuracy": -1.0, "best_step": -1, "tokens_seen": 0, "train_time_s": 0.0}
    resume_path = dist_info.broadcast(checkpoint.find_resume(tc.resume, run_dir, config) if is_main else None)
    saved = checkpoint.load_latest(resume_path, network, optimizer) if resume_path else None
    if saved:
        scheduler.load_state_dict(saved["scheduler"])
        counters.update(saved["counters"])
        checkpoint.set_rng_state(saved["rng"])
        log.info("resumed from %s at step %d", resume_path, counters["step"])
    logger = RunLogger(run_dir, cfg.logger, config,
                       history=resume_path.parent.parent / "metrics.jsonl" if saved else None,
                       resume_step=counters["step"], wandb_id=saved.get("wandb_id") if saved else None,
                       ) if is_main else SilentLogger()

    def save_latest():
        checkpoint.save_latest(run_dir / "checkpoints", network, optimizer, {
            "scheduler": scheduler.state_dict(), "counters": dict(counters), "rng": checkpoint.rng_state(),
            "config": config, "wandb_id": logger.wandb_id}, dist_info)

    def run_eval():
        metrics = evaluate(forward, splits["test"], batch_size=tc.eval_batch_size, device=device, autocast=autocast)
        if cfg.task.name == "lm":
            metrics["test/perplexity"] = math.exp(min(metrics["test/loss"], 700.0))
        metrics = dist_info.broadcast(metrics)  # every rank takes rank 0's decisions below
        logger.log(counters["step"], metrics)
        if metrics["test/accuracy"] > counters["best_accuracy"]:
            counters.update(best_accuracy=metrics["test/accuracy"], best_step=counters["step"])
            weights = checkpoint.full_model_state(network)
            if is_main:
                checkpoint.save(run_dir / "checkpoints" / "best.pt", {
                    "model": weights, "counters": dict(counters), "metrics": metrics, "config": config})
        return metrics

    status, error, metrics, loss_value, last_eval_step = "completed", None, {}, float("nan"), -1
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    network.train()
    with StopRequest() as stop, Progress(*columns, disable=not (tc.progress and is_main)) as progress:
        bar = progress.add_task(f"{cfg.task.name}/{model_cfg.name}", total=tc.max_steps,
                                completed=counters["step"], info="")
        window_time, window_steps = 0.0, 0  # time spent in training steps since the last log line
        while counters["step"] < tc.max_steps:
            step_start = time.time()
            step, lr = counters["step"], scheduler.get_last_lr()[0]
            idx = batch_indices(step, seed=cfg.seed, batch_size=tc.batch_size, num_examples=len(train_x))
            global_scored = (train_y[idx] != IGNORE_INDEX).sum().item()   # known to every rank without messages
            micro_batches = dist_info.shard(idx).chunk(tc.grad_accum_steps)
            loss_sum = torch.zeros((), device=device)  # this rank's summed token losses
            for i, micro in enumerate(micro_batches):
                scored = (train_y[micro] != IGNORE_INDEX).sum().item()  # on the CPU copy: no device sync
                x, y = train_x[micro].to(device, non_blocking=True), train_y[micro].to(device, non_blocking=True)
                with gradient_sync(network, enabled=i == len(micro_batches) - 1):
                    with autocast():
                        logits = forward(x)
                    # summed token loss; with no scored token a zero that keeps the graph (all ranks must reduce)
                    loss = lm_loss(logits, y) * scored if scored else logits.sum() * 0.0
                    # DDP and FSDP average gradients over ranks: scaled so the result is the global token mean's
                    (loss * dist_info.world_size / global_scored).backward()
                loss_sum += loss.detach()
            totals = dist_info.all_reduce_sum(torch.stack([loss_sum, loss_sum.new_tensor(float(stop.signal is not None))]))
            loss_value, stop_requested = totals[0].item() / global_scored, totals[1].item() > 0
            if not math.isfinite(loss_value):
                status, error = "diverged", f"loss became {loss_value} at step {step}"
                break
            grad_norm = full_value(torch.nn.utils.clip_grad_norm_(network.parameters(), tc.grad_clip)).item()
            if not math.isfinite(grad_norm):
                status, error = "diverged", f"gradient norm became {grad_norm} at step {step}"
                break
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            counters["step"] = step = step + 1
            counters["tokens_seen"] += tokens_per_step
            window_time += time.time() - step_start
            window_steps += 1

            if step % tc.log_interval == 0 or step == tc.max_steps:
                counters["train_time_s"] += window_time
                tokens_per_s = window_steps * tokens_per_step / max(window_time, 1e-9)
                logger.log(step, {"train/loss": loss_value, "train/lr": lr, "train/grad_norm": grad_norm,
                                  "perf/tokens_per_s": tokens_per_s})
                acc = f"  acc {metrics['test/accuracy']:.3f}" if metrics else ""
                progress.update(bar, completed=step, info=f"loss {loss_value:.4f}{acc}  {tokens_per_s:,.0f} tok/s")
                window_time, window_steps = 0.0, 0
            if step % tc.eval_interval == 0 or step == tc.max_steps:
                metrics, last_eval_step = run_eval(), step
                if tc.target_accuracy is not None and metrics["test/accuracy"] >= tc.target_accuracy:
                    log.info("test/accuracy %.4f >= target %.4f at step %d: stopping early",
                             metrics["test/accuracy"], tc.target_accuracy, step)
                    save_latest()
                    break
            if step % tc.checkpoint_interval == 0 or step == tc.max_steps:
                save_latest()
            if stop_requested:
                save_latest()
                signal_name = stop.signal or "a signal to another rank"
                status, error = "failed", f"stopped by {signal_name} at step {step}; resume with trainer.resume=true"
                break

    if last_eval_step != counters["step"]:
        metrics = run_eval()
    results = {
        "status": status,
        **({"error": error} if error else {}),
        **metrics,
        "best/accuracy": counters["best_accuracy"], "best/step": counters["best_step"],
        "steps": counters["step"], "train/loss": loss_value, "num_params": num_params,
        "wall_time_s": time.time() - start,
        "tokens_per_s": counters["tokens_seen"] / max(counters["train_time_s"], 1e-9),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "world_size": dist_info.world_size, "strategy": dist_info.strategy,
        "resumed_from": str(resume_path) if resume_path else None,
    }
    if device.type == "cuda":
        results["mem/peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    logger.finish({k: v for k, v in results.items() if isinstance(v, (int, float, str))})
    return results
