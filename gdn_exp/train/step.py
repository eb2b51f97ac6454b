"""The training step as device work only: gather the batch from the device-resident split, forward, token loss,
backward, gradient clipping and AdamW, with nothing read back to the host.

With nothing to read back, a step on one CUDA device is captured once into a CUDA graph and then replayed: a
small model's eager step is bound by Python and kernel launches, not by the GPU (the MQAR reference job on the
H200: ~280 kernels, 1.5 ms of GPU work, 15 ms eager; docs/perf.md). Each step's loss and gradient norm go to a
device buffer that the loop reads when it logs, evaluates or checkpoints. From a step whose gradient norm is
not finite up to that read, the fused AdamW leaves the weights as they were (its `found_inf`), so a diverged
run stops with the weights from before its first non-finite step.
"""
import torch

from gdn_exp.ops.backend import compile_ahead
from gdn_exp.train.distributed import full_value, gradient_sync
from gdn_exp.train.evaluate import lm_loss
from tasks import IGNORE_INDEX

WARMUP_STEPS = 2  # eager steps before the capture: Triton compilation, cuBLAS workspaces, optimizer state


def place_lr(optimizer, device=None) -> None:
    """Makes each group's learning rate a Python float or, with `device`, a tensor there, which the scheduler then
    updates in place: a captured AdamW step reads it from the device (a float would be frozen into the graph).
    Also after a resume, whose saved groups hold whatever form the saving run used."""
    for group in optimizer.param_groups:
        lr = float(group["lr"])
        group["lr"] = lr if device is None else torch.tensor(lr, dtype=torch.float32, device=device)


class TrainStep:
    """`train_step(indices)` trains on the examples `indices` (LongTensor [batch_size] on the device) of `data`
    (a `train.data.DeviceSplit`); `read()` returns the loss and gradient norm of the steps since the last read.

    Args:
        network: the module to train (DDP/FSDP-wrapped or not), called as network(input_ids, positions=...).
        optimizer: AdamW over its parameters; with `cuda_graph`, capturable and with device learning rates.
        grad_accum_steps: micro-batches per step on this rank.
        autocast: a context factory for the forward pass.
        dist_info: this process's `Distributed`.
        cuda_graph: capture the step after WARMUP_STEPS eager ones and replay it from then on.
        window: the most steps between two reads.
    """

    def __init__(self, network, optimizer, data, *, batch_size: int, grad_accum_steps: int, grad_clip: float,
                 autocast, dist_info, cuda_graph: bool, window: int):
        device = data.input_ids.device
        self.network, self.optimizer, self.data = network, optimizer, data
        self.grad_accum_steps, self.grad_clip = grad_accum_steps, grad_clip
        self.autocast, self.dist = autocast, dist_info
        self.cuda_graph, self.graph, self.eager_steps = cuda_graph, None, 0
        self.kernels_compiled = False
        self.indices = torch.zeros(batch_size, dtype=torch.long, device=device)   # the step's input
        self.record = torch.zeros(2, device=device)                # its output: loss share, gradient norm
        self.history = torch.zeros(window, 2, device=device)       # the records since the last read
        self.rows = 0
        if optimizer.defaults.get("fused"):  # the fused AdamW skips its update where found_inf is 1
            optimizer.found_inf = torch.zeros((), device=device, dtype=torch.float32)

    def forward_backward(self, sync: bool = True):
        """Forward and backward on self.indices, the gradients synchronised over ranks at the last micro-batch
        (with `sync`); returns (this rank's summed token loss, the global number of scored tokens)."""
        micro_batches = self.dist.shard(self.indices).chunk(self.grad_accum_steps)
        global_scored = (self.data.labels[self.indices] != IGNORE_INDEX).sum().clamp(min=1)
        loss_sum = torch.zeros((), device=self.record.device)
        for i, micro in enumerate(micro_batches):
            input_ids, positions, labels = self.data.batch(micro)
            with gradient_sync(self.network, enabled=sync and i == len(micro_batches) - 1):
                with self.autocast():
                    logits = self.network(input_ids, positions=positions)
                loss = lm_loss(logits, labels, reduction="sum")
                # DDP and FSDP average gradients over ranks: scaled so the result is the global token mean's
                (loss * self.dist.world_size / global_scored).backward()
            loss_sum += loss.detach()
        return loss_sum, global_scored

    def compile_kernels(self) -> int:
        """Compiles the step's and evaluation's Triton kernels in parallel (`ops.compile_ahead`) before the first
        step, which would compile them one by one; returns how many. The recording pass's gradients are
        garbage and dropped."""
        def step_and_evaluation():
            self.forward_backward(sync=False)
            input_ids, positions, _ = self.data.batch(self.indices[:1])
            with torch.no_grad(), self.autocast():
                self.network(input_ids, positions=positions)
        compiled = compile_ahead(step_and_evaluation)
        self.optimizer.zero_grad(set_to_none=True)
        self.kernels_compiled = True
        return compiled

    def compute(self) -> None:
        """One step on self.indices; writes (this rank's share of the global token-mean loss, gradient norm)
        into self.record."""
        loss_sum, global_scored = self.forward_backward()
        grad_norm = full_value(torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip))
        if hasattr(self.optimizer, "found_inf"):  # the norm is global, so every rank skips alike; once set, it
            # stays set until `read`, so the weights stay those before the first non-finite step
            torch.maximum(self.optimizer.found_inf, (~torch.isfinite(grad_norm)).float(),
                          out=self.optimizer.found_inf)
        self.optimizer.step()
        self.record.copy_(torch.stack([loss_sum / global_scored, grad_norm.float()]))

    def eager(self) -> None:
        self.compute()
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, indices: torch.Tensor) -> None:
        self.indices.copy_(indices)
        if not self.kernels_compiled and self.indices.is_cuda:
            self.compile_kernels()
        self.run()

    def run(self) -> None:
        """The step on the inputs in place: replayed, eager, or a warm-up or capture; its record kept for `read`."""
        if self.graph is not None:
            self.graph.replay()
        elif not self.cuda_graph:
            self.eager()
        else:
            self.warm_up_or_capture()
        self.history[self.rows].copy_(self.record)
        self.rows += 1

    def warm_up_or_capture(self) -> None:
        if self.eager_steps < WARMUP_STEPS:  # on a side stream, as torch's CUDA graph notes ask
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.eager()
            torch.cuda.current_stream().wait_stream(side)
            self.eager_steps += 1
            return
        # the gradients are None here, so the captured backward writes them (replays overwrite, not add)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.compute()
        self.graph.replay()  # the capture recorded the step without running it

    def read(self) -> torch.Tensor:
        """Host FloatTensor [n, 2]: (global token-mean loss, gradient norm) of each of the n steps since the last
        read, oldest first. Waits for them; call on every rank at the same step."""
        losses = self.dist.all_reduce_sum(self.history[: self.rows, 0].clone())  # the ranks' shares add up
        rows = torch.stack([losses, self.history[: self.rows, 1]], dim=1).cpu()
        self.rows = 0
        if hasattr(self.optimizer, "found_inf"):
            self.optimizer.found_inf.zero_()
        return rows
