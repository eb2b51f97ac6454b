"""Probe: where the time of a small training step goes on one GPU, and how concurrent small jobs share it.

The MQAR reference job (2 layers, d_model 128, one head of 128, T 256, batch 64, vocabulary 8192) per mixer:
eager step as the trainer ran it (full logits, two host syncs), eager with the head at scored positions and no
sync, and the whole step (forward, backward, clip, AdamW) replayed from one CUDA graph. Then k such jobs at once:
k graphs on k streams of one process (one thread, and k threads), and k processes.

    python scripts/probe_small_steps.py [--out results.json]
"""
import argparse
import json
import multiprocessing as mp
import threading
import time

import torch

import tasks
from gdn_exp.model import LanguageModel, ModelConfig
from gdn_exp.ops import cross_entropy_loss

VOCAB, T, B, PAIRS = 8192, 256, 64, 16
MIXERS = {"gdn": {}, "no_delta": {"use_delta": False}, "no_gate": {"use_gate": False},
          "attention": {"mixer": "attention"}}


def make_data(n=4096):
    batch = tasks.make_task("mqar", seed=0, num_examples=n, vocab_size=VOCAB, seq_len=T, num_kv_pairs=PAIRS)
    x, y = batch["input_ids"], batch["labels"]
    scored = y != -100
    P = int(scored.sum(1).max())
    pos = torch.sort(scored.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :P]
    return x.cuda(), pos.cuda(), y.gather(1, pos).cuda(), y.cuda()


class Job:
    def __init__(self, mixer, data, seed=0):
        torch.manual_seed(seed)
        cfg = ModelConfig(name="ref", vocab_size=VOCAB, d_model=128, n_layers=2, num_heads=1, head_dim=128,
                          **MIXERS[mixer])
        self.model = LanguageModel(cfg).cuda()
        self.lr = torch.tensor(1e-3, device="cuda")
        self.opt = torch.optim.AdamW(self.model.param_groups(0.1), lr=self.lr, betas=(0.9, 0.95), fused=True,
                                     capturable=True)
        self.x, self.pos, self.lab, self.y = data
        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.idx_block = torch.randint(len(self.x), (1024, B), device="cuda", generator=gen)
        self.idx = torch.zeros(B, dtype=torch.long, device="cuda")
        self.i = 0
        self.graph = None

    def body(self, full=False):
        x = self.x[self.idx]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if full:
                logits, y = self.model(x), self.y[self.idx]
            else:
                logits, y = self.model(x, positions=self.pos[self.idx]), self.lab[self.idx]
        loss_sum = cross_entropy_loss(logits.flatten(0, 1), y.flatten(), reduction="sum")
        loss = loss_sum / (y != -100).sum()
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=True)
        self.opt.step()
        return loss.detach(), gn

    def next_batch(self):
        self.idx.copy_(self.idx_block[self.i % 1024])
        self.i += 1

    def eager(self, full=False, sync=False):
        self.next_batch()
        loss, gn = self.body(full)
        self.opt.zero_grad(set_to_none=True)
        if sync:
            loss.item(), gn.item()
        return loss

    def capture(self):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.eager()
        torch.cuda.current_stream().wait_stream(side)
        self.opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.loss, self.gn = self.body()

    def replay(self):
        self.next_batch()
        self.graph.replay()


def timed(fn, n):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3, host / n * 1e3


def count_kernels(job):
    from torch.profiler import ProfilerActivity, profile
    job.eager()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        job.eager()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    total_us = sum(e.device_time for e in events)
    top = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:12]
    return len(events), total_us / 1e3, [(e.key[:60], e.count, round(e.device_time_total, 1)) for e in top]


def single(mixer, data, results):
    job = Job(mixer, data)
    t0 = time.perf_counter()
    job.eager(full=True, sync=True)
    first = time.perf_counter() - t0
    for _ in range(5):
        job.eager(full=True, sync=True)
    r = {"first_step_s": first}
    r["eager_full_sync_ms"], _ = timed(lambda: job.eager(full=True, sync=True), 30)
    r["eager_scored_nosync_ms"], r["eager_scored_host_ms"] = timed(lambda: job.eager(), 50)
    r["kernels"], r["kernel_ms"], r["top"] = count_kernels(job)
    job.capture()
    for _ in range(20):
        job.replay()
    r["graph_ms"], r["graph_host_ms"] = timed(job.replay, 500)
    r["loss"] = job.loss.item()
    r["mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    results[mixer] = r
    print(mixer, {k: v for k, v in r.items() if k != "top"}, flush=True)
    for row in r["top"]:
        print("   ", row)
    return job


def run_streams(mixer, data, k, seconds=3.0, threads=False):
    jobs = [Job(mixer, data, seed=i) for i in range(k)]
    streams = [torch.cuda.Stream() for _ in range(k)]
    for job, s in zip(jobs, streams):
        with torch.cuda.stream(s):
            job.capture()
    torch.cuda.synchronize()
    counts = [0] * k

    def loop(i, stop):
        with torch.cuda.stream(streams[i]):
            while time.perf_counter() < stop:
                jobs[i].replay()
                counts[i] += 1

    stop = time.perf_counter() + seconds
    t0 = time.perf_counter()
    if threads:
        ths = [threading.Thread(target=loop, args=(i, stop)) for i in range(k)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
    else:
        while time.perf_counter() < stop:
            for i in range(k):
                with torch.cuda.stream(streams[i]):
                    jobs[i].replay()
                counts[i] += 1
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    jobs.clear()  # the graphs and their memory go before the next k
    torch.cuda.empty_cache()
    return sum(counts) / elapsed


def worker(mixer, start_at, seconds, queue):
    data = make_data(1024)
    job = Job(mixer, data)
    job.capture()
    torch.cuda.synchronize()
    while time.time() < start_at:
        time.sleep(0.001)
    n, t0 = 0, time.perf_counter()
    while time.time() < start_at + seconds:
        job.replay()
        n += 1
    torch.cuda.synchronize()
    queue.put(n / (time.perf_counter() - t0))


def run_processes(mixer, k, seconds=5.0):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 25 + 2 * k  # time for every process to start, build and capture
    procs = [ctx.Process(target=worker, args=(mixer, start_at, seconds, queue)) for _ in range(k)]
    for p in procs:
        p.start()
    rates = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="probe_small_steps.json")
    parser.add_argument("--mixers", default="gdn,no_delta,no_gate,attention")
    parser.add_argument("--streams", default="1,2,4,8,16")
    parser.add_argument("--processes", default="1,4,8")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    t0 = time.perf_counter()
    data = make_data()
    print(f"data {time.perf_counter() - t0:.1f} s", flush=True)
    results = {"device": torch.cuda.get_device_name(), "single": {}, "streams": {}, "threads": {}, "processes": {}}
    for mixer in args.mixers.split(","):
        single(mixer, data, results["single"])
        torch.cuda.empty_cache()
    for mixer in ("gdn", "attention"):
        for k in map(int, args.streams.split(",")):
            rate = run_streams(mixer, data, k)
            results["streams"][f"{mixer}/{k}"] = rate
            print(f"streams {mixer} k={k}: {rate:.0f} steps/s", flush=True)
        for k in (4, 8):
            rate = run_streams(mixer, data, k, threads=True)
            results["threads"][f"{mixer}/{k}"] = rate
            print(f"threads {mixer} k={k}: {rate:.0f} steps/s", flush=True)
    for k in map(int, args.processes.split(",")):
        rate = run_processes("gdn", k)
        results["processes"][f"gdn/{k}"] = rate
        print(f"processes gdn k={k}: {rate:.0f} steps/s", flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
