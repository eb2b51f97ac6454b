"""The training loop, top to bottom: data, model, optimizer, then step / log / evaluate / checkpoint.

One process or several (torchrun, see `gdn_exp.train.distributed`): every step draws the same global batch
indices on every rank, each rank trains on its share in trainer.grad_accum_steps micro-batches, and the loss
is normalised by the global number of scored tokens, so the update does not depend on the number of ranks.
The step itself (`train.step`) reads nothing back to the host; the loop reads its losses only when it logs,
evaluates or checkpoints, so that on a GPU the host runs ahead of the device.
"""
import json
import logging
import math
import signal
import sys
import threading
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gdn_exp.config import precision_used
from gdn_exp.data import PackedDocuments, make_tokenizer, task_source
from gdn_exp.model import LanguageModel, ModelConfig
from gdn_exp.train import checkpoint
from gdn_exp.train.data import BatchIndices, DeviceSplit, StreamedSplit, device_splits
from gdn_exp.train.distributed import Distributed, wrap_model
from gdn_exp.train.evaluate import evaluate_splits, reached_target
from gdn_exp.train.loggers import RunLogger, SilentLogger
from gdn_exp.train.step import TrainStep, place_lr
from gdn_exp.train.threads import auto_threads, describe_threads

log = logging.getLogger(__name__)
step_log = logging.getLogger("gdn_exp.progress")  # step lines: a sweep's console leaves them to each job's log


def lr_multiplier(step: int, *, warmup_steps: int, decay_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_lr_ratio at decay_steps, then flat. A pure function of the step:
    where a run stops (max_steps, an early stop) never changes the rate of the steps it runs."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def describe_mixers(cfg: ModelConfig) -> str:
    """The start-up line's words for the layers' mixers: `gdn mixer`, `attention mixer` or, for a hybrid,
    `gdn mixer, attention in layers 2, 4 of 4` (counted from 1; `, window 2048` for sliding-window attention)."""
    kinds = cfg.layer_mixers()
    if len(set(kinds)) == 1:
        return f"{kinds[0]} mixer"
    layers = ", ".join(str(i + 1) for i, kind in enumerate(kinds) if kind == "attention")
    window = f", window {cfg.attention_window}" if cfg.attention_window else ""
    return f"gdn mixer, attention in layers {layers} of {len(kinds)}{window}"


CPU_PARAMS_WARNING = 100_000_000  # a model this big on a CPU gets a warning at start-up (gdn_400m: 419M)
def lr_schedule(tc):
    """The trainer config's learning-rate multiplier as a function of the step (`lr_multiplier`): the cosine runs
    over trainer.lr_decay_steps (null: max_steps)."""
    return partial(lr_multiplier, warmup_steps=tc.warmup_steps, decay_steps=tc.lr_decay_steps or tc.max_steps,
                   min_lr_ratio=tc.min_lr_ratio)


def prepare_process(tc, dist_info: Distributed):
    """Sets this process's CPU threads (trainer.num_threads, null: its share of the cores) and returns the forward
    pass's context factory: bf16 autocast where trainer.precision (auto: bf16 on CUDA) asks for it."""
    torch.set_num_threads(tc.num_threads or auto_threads(dist_info.world_size))  # ranks share the machine's cores
    if precision_used(tc.precision, dist_info.device.type) != "bf16":
        return nullcontext
    # no weight-cast cache: a cast cached while capturing a CUDA graph would be freed under the graph
    return partial(torch.autocast, dist_info.device.type, dtype=torch.bfloat16, cache_enabled=False)


def write_config(run_dir: Path, config: dict, dist_info: Distributed) -> None:
    """run_dir/config.yaml: the resolved config, with what each `auto` chose (beside Hydra's .hydra/config.yaml,
    which keeps the interpolations)."""
    tc = config["trainer"]
    used = {"device": str(dist_info.device), "precision": precision_used(tc["precision"], dist_info.device.type),
            "strategy": dist_info.strategy, "num_threads": torch.get_num_threads()}
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml({**config, "trainer": {**tc, **used}}))


def new_counters() -> dict:
    """A run's counters, saved in its checkpoints (a solo run's and each model's of a pack): target_step is the
    first evaluation at trainer.target_accuracy (None: not yet), wall_time_s the wall time of a resumed run's
    earlier segments."""
    return {"step": 0, "best_accuracy": -1.0, "best_step": -1, "target_step": None, "tokens_seen": 0,
            "train_time_s": 0.0, "wall_time_s": 0.0}


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)  # SIGUSR2: SLURM's warning before a time limit


class StopRequest:
    """Turns SIGTERM / SIGINT / SIGUSR2 into a flag the loop checks between steps, so a kill leaves a checkpoint.

    The flag is the process's and stays set: a sweep worker (`gdn_exp.sweep`) that got a signal between jobs, or
    whose job was stopped, starts no other job."""

    signal = None  # the name of the first stop signal this process received

    def __enter__(self):
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # this job owns the process's signals
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    @staticmethod
    def _handle(signum, frame):
        if StopRequest.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: now, not after a step that may take minutes (a big model)
        request_stop(signal.Signals(signum).name)
        log.warning("%s: stopping after this step with a checkpoint%s", StopRequest.signal,
                    " (Ctrl-C again: stop now, without one)" if signum == signal.SIGINT else "")

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        # A handler that was there before (submitit's on SIGUSR2: requeue the job) runs now, after the checkpoint.
        received = self._previous.get(getattr(signal, StopRequest.signal or "", None))
        if callable(received) and received is not signal.default_int_handler:
            received(getattr(signal, StopRequest.signal), None)


def request_stop(signal_name: str) -> None:
    """Asks every job of this process to checkpoint and stop after its current step."""
    if StopRequest.signal is None:
        StopRequest.signal = signal_name


def train(cfg, run_dir: Path, dist_info: Distributed) -> dict:
    """Trains the configured model on the configured task; returns the results dict of results.json.

    Runs on every rank of a distributed job (`dist_info`); only rank 0 writes under run_dir.
    """
    start = time.time()
    tc = cfg.trainer
    device, is_main = dist_info.device, dist_info.is_main
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    autocast = prepare_process(tc, dist_info)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    varlen = cfg.task.get("varlen", False)  # task=lm: documents packed with their boundaries
    if is_main:
        write_config(run_dir, config, dist_info)

    if not is_main:  # rank 0 fills the data cache first, the others then read it
        dist_info.barrier()
    splits = device_splits((json.dumps(config["task"], sort_keys=True), cfg.seed, cfg.task_cache_dir),
                           partial(task_source(cfg.task.name).load, cfg), device)
    if is_main:
        dist_info.barrier()
    train_split = splits["train"]
    if isinstance(train_split, DeviceSplit):  # each step's examples are gathered on the device
        indices = BatchIndices(seed=cfg.seed, batch_size=tc.batch_size, num_examples=len(train_split), device=device)
    else:  # rows read on the host (task=lm's memory-mapped tokens): each step copies its own into a device buffer
        train_split = indices = StreamedSplit(train_split, seed=cfg.seed, batch_size=tc.batch_size, device=device)
    tokens_per_step = tc.batch_size * train_split.input_ids.shape[1]

    model_cfg = ModelConfig(**config["model"])
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = LanguageModel(model_cfg, mode=config["kernel"]["mode"], backend=config["kernel"]["backend"]).to(device)
    num_params = model.num_params()
    # a CUDA graph needs fixed shapes and no host round trip inside the step: packed documents (their boundaries
    # are read on the host) and several ranks (their collectives) run eagerly
    graphed = tc.cuda_graph and device.type == "cuda" and dist_info.world_size == 1 and not varlen
    log.info("model %s (d_model %d, %d layers): %s parameters (%s without embeddings; %s, kernel %s/%s) "
             "on %s x %d (%s%s), %s", model_cfg.name, model_cfg.d_model, model_cfg.n_layers, f"{num_params:,}",
             f"{model.num_params(exclude_embeddings=True):,}", describe_mixers(model_cfg), cfg.kernel.mode,
             cfg.kernel.backend,
             device.type, dist_info.world_size, dist_info.strategy, ", CUDA graph" if graphed else "",
             describe_threads(tc.num_threads, torch.get_num_threads()))
    if device.type == "cpu" and num_params > CPU_PARAMS_WARNING:
        log.warning("model %s has %.0fM parameters: it is meant for a GPU; on a CPU one step can take minutes and "
                    "more memory than the machine has", model_cfg.name, num_params / 1e6)
    network = wrap_model(model, dist_info.strategy, device, tc.activation_checkpointing)
    # varlen: the model sees each batch as packed documents that never attend across a boundary
    forward = PackedDocuments(network, make_tokenizer(cfg.task.tokenizer).bos_id) if varlen else network
    optimizer = torch.optim.AdamW(model.param_groups(tc.weight_decay), lr=tc.lr, betas=tuple(tc.betas),
                                  fused=dist_info.strategy != "fsdp", capturable=graphed)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(tc))

    counters = new_counters()
    resume_path = dist_info.broadcast(checkpoint.find_resume(tc.resume, run_dir, config) if is_main else None)
    saved = checkpoint.load_latest(resume_path, network, optimizer) if resume_path else None
    if saved:
        scheduler.load_state_dict(saved["scheduler"])
        counters.update(saved["counters"])
        checkpoint.set_rng_state(saved["rng"])
        log.info("resumed from %s at step %d", resume_path, counters["step"])
    earlier_s = counters["wall_time_s"]  # a resumed run's wall time counts its earlier segments too
    place_lr(optimizer, device if graphed else None)
    logger = RunLogger(run_dir, cfg.logger, config,
                       history=resume_path.parent.parent / "metrics.jsonl" if saved else None,
                       resume_step=counters["step"], history_rows=saved.get("metrics_rows") if saved else None,
                       wandb_id=saved.get("wandb_id") if saved else None,
                       ) if is_main else SilentLogger()
    train_step = TrainStep(forward, optimizer, train_split, batch_size=tc.batch_size,
                           grad_accum_steps=tc.grad_accum_steps, grad_clip=tc.grad_clip, autocast=autocast,
                           dist_info=dist_info, cuda_graph=graphed, window=tc.log_interval)

    def save_latest():
        counters["wall_time_s"] = earlier_s + time.time() - start
        checkpoint.save_latest(run_dir / "checkpoints", network, optimizer, {
            "scheduler": scheduler.state_dict(), "counters": dict(counters), "rng": checkpoint.rng_state(),
            "config": config, "wandb_id": logger.wandb_id, "metrics_rows": logger.rows}, dist_info)

    def run_eval():
        metrics = evaluate_splits(forward, splits, batch_size=tc.eval_batch_size, autocast=autocast)
        if task_source(cfg.task.name).text:
            metrics["test/perplexity"] = math.exp(min(metrics["test/loss"], 700.0))
        metrics = dist_info.broadcast(metrics)  # every rank takes rank 0's decisions below
        logger.log(counters["step"], metrics)
        if counters["target_step"] is None and reached_target(metrics, tc.target_accuracy):
            counters["target_step"] = counters["step"]
        if math.isfinite(metrics["test/loss"]) and metrics["test/accuracy"] > counters["best_accuracy"]:
            counters.update(best_accuracy=metrics["test/accuracy"], best_step=counters["step"])
            weights = checkpoint.full_model_state(network)
            if is_main:
                checkpoint.save(run_dir / "checkpoints" / "best.pt", {
                    "model": weights, "counters": dict(counters), "metrics": metrics, "config": config})
        return metrics

    def stop_requested() -> bool:
        """A signal arrived here or, with several ranks, on any rank (a collective each step: ranks stop together)."""
        if dist_info.world_size == 1:
            return stop.signal is not None
        return dist_info.all_reduce_sum(torch.tensor(float(stop.signal is not None), device=device)).item() > 0

    status, error, metrics, loss_value, last_eval_step, first_step_s = "completed", None, {}, float("nan"), -1, None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    network.train()
    # a live bar on a terminal; elsewhere (a log file, trainer.progress=false, a sweep job) one plain line per log step
    live_bar = tc.progress and is_main and sys.stderr.isatty()
    with StopRequest() as stop, Progress(*columns, disable=not live_bar) as progress:
        bar = progress.add_task(f"{cfg.task.name}/{model_cfg.name}", total=tc.max_steps,
                                completed=counters["step"], info="")
        window_start = time.perf_counter()
        log_time, log_steps = 0.0, 0  # time in training steps and steps since the last log line
        while counters["step"] < tc.max_steps:
            step = counters["step"]
            train_step(indices(step))
            if first_step_s is None:  # start-up: data, model, compilation, the first step (one wait, once)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                first_step_s = time.time() - start
            scheduler.step()
            counters["step"] = step = step + 1
            counters["tokens_seen"] += tokens_per_step
            log_steps += 1
            stopping = stop_requested()
            if not (stopping or step == tc.max_steps or step % tc.log_interval == 0 or step % tc.eval_interval == 0
                    or step % tc.checkpoint_interval == 0):
                continue

            rows = train_step.read()  # waits for the steps since the last read
            elapsed = time.perf_counter() - window_start
            counters["train_time_s"] += elapsed
            log_time += elapsed
            nonfinite = (~torch.isfinite(rows)).any(1).nonzero()
            if len(nonfinite):  # with the fused AdamW the weights are those from before this step (TrainStep)
                bad = int(nonfinite[0])
                counters["step"] = step - len(rows) + bad
                counters["tokens_seen"] -= (len(rows) - bad) * tokens_per_step
                column = 0 if not math.isfinite(rows[bad, 0]) else 1
                what, value = ("loss", "gradient norm")[column], float(rows[bad, column])
                status, error = "diverged", f"{what} became {value} at step {counters['step']}"
                break
            loss_value, grad_norm = rows[-1].tolist()
            if step % tc.eval_interval == 0 or step == tc.max_steps:  # first, so that the step line shows it
                metrics, last_eval_step = run_eval(), step
            if step % tc.log_interval == 0 or step == tc.max_steps:
                tokens_per_s = log_steps * tokens_per_step / max(log_time, 1e-9)
                lr = scheduler.base_lrs[0] * scheduler.lr_lambdas[0](step - 1)  # the last step's
                logger.log(step, {"train/loss": loss_value, "train/lr": lr, "train/grad_norm": grad_norm,
                                  "perf/tokens_per_s": tokens_per_s})
                acc = f"  acc {metrics['test/accuracy']:.3f}" if metrics else ""
                info = f"loss {loss_value:.4f}{acc}  {tokens_per_s:,.0f} tok/s"
                progress.update(bar, completed=step, info=info)
                if is_main and not live_bar:
                    step_log.info("step %d/%d  %s", step, tc.max_steps, info)
                log_time, log_steps = 0.0, 0
            if last_eval_step == step and reached_target(metrics, tc.target_accuracy):
                log.info("test/accuracy %.4f >= target %.4f at step %d (and at every test length): stopping early",
                         metrics["test/accuracy"], tc.target_accuracy, step)
                save_latest()
                break
            if step % tc.checkpoint_interval == 0 or step == tc.max_steps:
                save_latest()
            if stopping:
                save_latest()
                signal_name = stop.signal or "a signal to another rank"
                status, error = "stopped", f"stopped by {signal_name} at step {step}; resume with trainer.resume=true"
                break
            window_start = time.perf_counter()

    if last_eval_step != counters["step"]:
        metrics = run_eval()
    results = {
        "status": status,
        **({"error": error} if error else {}),
        **metrics,
        "best/accuracy": counters["best_accuracy"], "best/step": counters["best_step"],
        "steps_to_target": counters["target_step"],
        "steps": counters["step"], "train/loss": loss_value, "num_params": num_params,
        "wall_time_s": earlier_s + time.time() - start, "first_step_s": first_step_s,
        "tokens_per_s": counters["tokens_seen"] / max(counters["train_time_s"], 1e-9),
        "steps_per_s": counters["tokens_seen"] / tokens_per_step / max(counters["train_time_s"], 1e-9),
        "cuda_graph": graphed,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "world_size": dist_info.world_size, "strategy": dist_info.strategy,
        "resumed_from": str(resume_path) if resume_path else None,
    }
    if device.type == "cuda":
        results["mem/peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    logger.finish({k: v for k, v in results.items() if isinstance(v, (int, float, str))})
    return results
