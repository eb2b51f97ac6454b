"""`gdn-bench sweep`: how fast the small jobs of a research grid train on one GPU, alone and several at once.

The reference job is the MQAR grid's middle point: 2 layers, d_model 128, one head of 128, T 256, 16 key-value
pairs, batch 64, vocabulary 8192. For each mixer (GDN, no_delta, no_gate, attention) it measures the trainer's
own step (`train.step.TrainStep`, the loop's per-step calls):
    eager_ms    without a CUDA graph, the loss read back every step (the trainer before graphs)
    step_ms     the replayed step, alone, with everything the loop does per step
    gpu_ms      the GPU's time per step (CUDA events over back-to-back replays)
    host_ms     the host's time per step while the GPU queue is not full (issuing the step, no waiting)
    kernels, kernel_ms: launches and summed kernel time of one eager step (torch profiler)
and then total steps/s of k jobs trained at once in one process, one thread and CUDA stream each, all captured
before any trains: how far the GPU overlaps small jobs. (The local launcher runs jobs in separate processes, which
the GPU time-slices instead: about the steps/s of one job; docs/perf.md.)
"""
import threading
import time
from functools import partial

import torch

import tasks
from gdn_exp.model import LanguageModel, ModelConfig
from gdn_exp.train.data import BatchIndices, DeviceSplit
from gdn_exp.train.distributed import Distributed
from gdn_exp.train.loop import lr_multiplier
from gdn_exp.train.step import TrainStep, place_lr

REFERENCE = dict(d_model=128, n_layers=2, num_heads=1, head_dim=128, vocab_size=8192, seq_len=256,
                 num_kv_pairs=16, batch_size=64)
MIXERS = {"gdn": {}, "no_delta": {"use_delta": False}, "no_gate": {"use_gate": False},
          "attention": {"mixer": "attention"}}
LOG_INTERVAL = 50  # steps between the loop's reads of the losses


class Job:
    """One reference job as the trainer builds it: model, AdamW, schedule, batches and the graphed step."""

    def __init__(self, mixer: str, data: DeviceSplit, *, seed: int = 0, cuda_graph: bool = True, ref=REFERENCE):
        device = data.input_ids.device
        torch.manual_seed(seed)
        cfg = ModelConfig(name="reference", vocab_size=ref["vocab_size"], d_model=ref["d_model"],
                          n_layers=ref["n_layers"], num_heads=ref["num_heads"], head_dim=ref["head_dim"],
                          **MIXERS[mixer])
        self.model = LanguageModel(cfg).to(device)
        self.optimizer = torch.optim.AdamW(self.model.param_groups(0.1), lr=1e-3, betas=(0.9, 0.95), fused=True,
                                           capturable=cuda_graph)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(
            lr_multiplier, warmup_steps=100, decay_steps=10**6, min_lr_ratio=0.1))
        place_lr(self.optimizer, device if cuda_graph else None)
        autocast = partial(torch.autocast, "cuda", dtype=torch.bfloat16, cache_enabled=False)
        self.train_step = TrainStep(self.model, self.optimizer, data, batch_size=ref["batch_size"],
                                    grad_accum_steps=1, grad_clip=1.0, autocast=autocast,
                                    dist_info=Distributed(0, 1, device, "none"), cuda_graph=cuda_graph,
                                    window=LOG_INTERVAL)
        self.indices = BatchIndices(seed=seed, batch_size=ref["batch_size"], num_examples=len(data), device=device)
        self.step = 0

    def run(self, steps: int, read_every: int = LOG_INTERVAL) -> None:
        """`steps` training steps with the loop's per-step calls; the losses read every `read_every` steps."""
        for _ in range(steps):
            self.train_step(self.indices(self.step))
            self.scheduler.step()
            self.step += 1
            if self.step % read_every == 0 or self.train_step.rows == LOG_INTERVAL:
                self.train_step.read()


def reference_split(device, num_examples: int = 8192, ref=REFERENCE) -> DeviceSplit:
    batch = tasks.make_task("mqar", seed=0, num_examples=num_examples, vocab_size=ref["vocab_size"],
                            seq_len=ref["seq_len"], num_kv_pairs=ref["num_kv_pairs"])
    return DeviceSplit.from_split(batch, device)


def wall_ms(fn, n: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn(n)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e3


def replay_ms(graph, n: int) -> float:
    """The GPU's time per replay of a captured step over n back-to-back replays (CUDA events)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def kernel_profile(job: Job) -> tuple:
    """(kernel launches, summed kernel ms) of one eager step."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        job.train_step.eager()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    return len(kernels), sum(e.device_time for e in kernels) / 1e3


def single_job(mixer: str, data: DeviceSplit) -> dict:
    """The per-mixer row: eager and graphed step times, GPU and host time per step, kernels per step."""
    eager = Job(mixer, data, cuda_graph=False)
    eager.run(3)  # compile
    row = {"mixer": mixer, "eager_ms": wall_ms(partial(eager.run, read_every=1), 20)}
    row["kernels"], row["kernel_ms"] = kernel_profile(eager)
    del eager
    job = Job(mixer, data)
    job.run(LOG_INTERVAL)  # warm-up, capture, and a window of replays
    row["step_ms"] = wall_ms(job.run, 10 * LOG_INTERVAL)
    row["gpu_ms"] = replay_ms(job.train_step.graph, 200)
    torch.cuda.synchronize()
    begin = time.perf_counter()
    job.run(10, read_every=10**9)  # the queue is empty: issuing does not wait for the GPU
    row["host_ms"] = (time.perf_counter() - begin) / 10 * 1e3
    torch.cuda.synchronize()
    job.train_step.read()
    row["mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def concurrent_jobs(mixer: str, data: DeviceSplit, k: int, seconds: float = 4.0) -> float:
    """Total steps/s of k jobs trained at once, one thread and CUDA stream each."""
    streams = [torch.cuda.Stream() for _ in range(k)]
    jobs = []
    for i, stream in enumerate(streams):
        with torch.cuda.stream(stream):
            job = Job(mixer, data, seed=i)
            job.run(5)  # compile and capture before the clock starts
            jobs.append(job)
    torch.cuda.synchronize()
    steps = [0] * k
    stop = time.perf_counter() + seconds

    def train(i):
        with torch.cuda.stream(streams[i]):
            while time.perf_counter() < stop:
                jobs[i].run(10)
                steps[i] += 10

    start = time.perf_counter()
    threads = [threading.Thread(target=train, args=(i,)) for i in range(k)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    torch.cuda.synchronize()
    return sum(steps) / (time.perf_counter() - start)


def bench_sweep(mixers=tuple(MIXERS), concurrency=(1, 4, 8, 16)) -> tuple:
    """(rows per mixer, rows per (mixer, k)) for the reference job on this GPU."""
    data = reference_split(torch.device("cuda"))
    single = []
    for mixer in mixers:
        single.append(single_job(mixer, data))
        print(single[-1], flush=True)
        torch.cuda.empty_cache()
    packed = []
    for mixer in mixers:
        row = {"mixer": mixer}
        for k in concurrency:
            row[f"steps_per_s_{k}"] = concurrent_jobs(mixer, data, k)
            torch.cuda.empty_cache()
        packed.append(row)
        print(row, flush=True)
    return single, packed
