"""`gdn-bench pack`: model-steps/s of a pack of M same-shape models (`gdn_exp.pack`, trained as
`train.pack_step.PackStep` does in a packed sweep) against M, for each mixer, at the reference job
(`dev.throughput.REFERENCE`) and at Zoology's T 512 point (d_model 64, batch 128, 64 key-value pairs).

The models of a pack differ in seed (initial weights, batch order) and learning rate, as a sweep's do. Per row:
    step_ms       wall time per pack step with the loop's per-step work (batch indices, learning rates), CUDA graph
    gpu_ms        the GPU's time per replayed step (CUDA events; None without a graph)
    model_steps_per_s   M / step_ms: what the pack gives a sweep, against one job's 1 / step_ms at M = 1
"""
from contextlib import nullcontext
from functools import partial

import torch

from gdn_exp.dev.throughput import LOG_INTERVAL, MIXERS, REFERENCE, reference_split, replay_ms, wall_ms
from gdn_exp.model import LanguageModel, ModelConfig
from gdn_exp.pack import ModelPack
from gdn_exp.train.data import BatchIndices
from gdn_exp.train.loop import lr_multiplier
from gdn_exp.train.pack_step import PackSplit, PackStep, StackedAdamW

POINTS = {"reference": REFERENCE,
          "zoology_t512": dict(REFERENCE, d_model=64, head_dim=64, seq_len=512, num_kv_pairs=64, batch_size=128)}
PACKS = (1, 2, 4, 8, 16, 32)
COLUMNS = ["point", "mixer", "M", "step_ms", "gpu_ms", "model_steps_per_s", "mem_gib", "error"]


class PackRun:
    """M reference-shaped models of `mixer` as one pack on `data`'s device, with the trainer's step."""

    def __init__(self, mixer: str, data, M: int, *, ref=REFERENCE, cuda_graph: bool = True, base_lrs=None):
        device = data.input_ids.device
        cfg = ModelConfig(name="reference", vocab_size=ref["vocab_size"], d_model=ref["d_model"],
                          n_layers=ref["n_layers"], num_heads=ref["num_heads"], head_dim=ref["head_dim"],
                          **MIXERS[mixer])
        models = []
        for seed in range(M):
            torch.manual_seed(seed)
            models.append(LanguageModel(cfg).to(device))
        self.pack = ModelPack(models)
        del models
        optimizer = StackedAdamW(self.pack, betas=[(0.9, 0.95)] * M, eps=[1e-8] * M, weight_decay=[0.1] * M)
        autocast = partial(torch.autocast, "cuda", dtype=torch.bfloat16, cache_enabled=False) \
            if device.type == "cuda" else nullcontext
        self.train_step = PackStep(self.pack, optimizer, PackSplit([data] * M), batch_size=ref["batch_size"],
                                   grad_accum_steps=1, grad_clip=[1.0] * M, autocast=autocast,
                                   cuda_graph=cuda_graph and device.type == "cuda", window=LOG_INTERVAL)
        self.indices = [BatchIndices(seed=seed, batch_size=ref["batch_size"], num_examples=len(data), device=device)
                        for seed in range(M)]
        self.base_lrs = base_lrs or [1e-3 * (1 + seed % 4) for seed in range(M)]   # a sweep's learning rates
        self.step = 0

    def run(self, steps: int) -> None:
        """`steps` pack steps with the trainer's per-step calls; the losses read every LOG_INTERVAL steps."""
        for _ in range(steps):
            multiplier = lr_multiplier(self.step, warmup_steps=100, decay_steps=10**6, min_lr_ratio=0.1)
            lr = torch.tensor([base * multiplier for base in self.base_lrs])
            self.train_step(torch.stack([indices(self.step) for indices in self.indices]), lr)
            self.step += 1
            if self.train_step.rows == LOG_INTERVAL:
                self.train_step.read()


def pack_row(point: str, mixer: str, M: int, data, ref, steps: int, warmup: int) -> dict:
    row = {"point": point, "mixer": mixer, "M": M}
    try:
        run = PackRun(mixer, data, M, ref=ref)
        run.run(warmup)  # compile, warm up, capture, a window of replays
        if data.input_ids.is_cuda:
            row["step_ms"] = wall_ms(run.run, steps)
            row["gpu_ms"] = replay_ms(run.train_step.graph, steps) if run.train_step.graph is not None else None
            row["mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            import time

            start = time.perf_counter()
            run.run(steps)
            row["step_ms"] = (time.perf_counter() - start) / steps * 1e3
        row["model_steps_per_s"] = M / row["step_ms"] * 1e3
    except torch.OutOfMemoryError as e:
        row["error"] = f"out of memory ({str(e).splitlines()[0][:60]})"
    return row


def bench_pack(points=tuple(POINTS), mixers=tuple(MIXERS), packs=PACKS, *, device="cuda", steps: int = 200,
               warmup: int = LOG_INTERVAL, refs=POINTS) -> list:
    """One row per (point, mixer, M); prints each as it comes."""
    rows = []
    for point in points:
        ref = refs[point]
        data = reference_split(torch.device(device), num_examples=4096, ref=ref)
        for mixer in mixers:
            for M in packs:
                rows.append(pack_row(point, mixer, M, data, ref, steps, warmup))
                print(rows[-1], flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
    return rows
