"""Task splits on the training device, each example with the positions its loss scores, and the batch indices
of every step.

A synthetic task scores a few positions per example (MQAR: the queried values, 16 of 256), so the model runs its
final norm and LM head on those positions only (`LanguageModel.forward(positions=...)`): for a small model the
head over all positions is most of the step. Splits stay on the device for the whole run, so a step gathers its
batch there instead of indexing on the host and copying.

A split too large for that (task=lm's rows of a memory-mapped token file, `data.lm.TokenRows`) stays on the host:
`StreamedSplit` reads each step's rows there and copies them into one device buffer that the step gathers from.
"""
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch

from gdn_exp.train.evaluate import IGNORE_INDEX


@dataclass
class DeviceSplit:
    """input_ids [N, T]; labels [N, P]: the targets at `positions` [N, P], each example's scored positions in
    order (P = the most any example has; an example with fewer is padded with unscored positions, label
    IGNORE_INDEX). positions is None where every position is scored (P = T, labels as the task gave them).
    slices: per-example slice columns [N] (e.g. num_kv_pairs), on the host."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    positions: Optional[torch.Tensor]
    slices: dict

    @classmethod
    def from_split(cls, split: dict, device: torch.device) -> "DeviceSplit":
        """From a task split {"input_ids", "labels" [N, T], slice columns [N]} (host tensors)."""
        labels = split["labels"]
        scored = labels != IGNORE_INDEX
        num_positions = max(1, int(scored.sum(1).max())) if len(labels) else 1
        positions = None
        if num_positions < labels.shape[1]:
            # scored positions first, each group in position order (a stable sort of the unscored flags)
            positions = torch.sort((~scored).to(torch.int8), dim=1, stable=True).indices[:, :num_positions]
            labels = labels.gather(1, positions)
            positions = positions.to(device)
        return cls(split["input_ids"].to(device), labels.to(device), positions,
                   {k: v for k, v in split.items() if k not in ("input_ids", "labels")})

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, index):
        """(input_ids [b, T], positions [b, P] or None, labels [b, P]) of the examples at `index` (a device
        LongTensor or a slice)."""
        positions = None if self.positions is None else self.positions[index]
        return self.input_ids[index], positions, self.labels[index]


_SPLITS: "OrderedDict[tuple, dict]" = OrderedDict()
_SPLITS_LOCK = threading.Lock()
KEEP_SPLITS = 4  # split sets kept on each device for the next job of the same task (jobs share one process)


def device_splits(key: tuple, load, device: torch.device) -> dict:
    """{name: DeviceSplit} of `load()` ({name: task split}) on `device`, shared by the jobs of this process that
    ask for the same `key` (task parameters and seed): one copy on the GPU, loaded once. A split that is not a
    dict of tensors (`data.lm.TokenRows`) is kept as it is, on the host, for a `StreamedSplit`."""
    with _SPLITS_LOCK:
        if (key, device) not in _SPLITS:
            _SPLITS[key, device] = {name: DeviceSplit.from_split(split, device) if isinstance(split, dict) else split
                                    for name, split in load().items()}
            while len(_SPLITS) > KEEP_SPLITS:
                _SPLITS.popitem(last=False)
        _SPLITS.move_to_end((key, device))
        return _SPLITS[key, device]


def batch_indices(step: int, *, seed: int, batch_size: int, num_examples: int) -> torch.Tensor:
    """The examples of a training step: a pure function of (seed, step), so resuming needs only the step."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(num_examples, (batch_size,), generator=generator)


class BatchIndices:
    """`batch_indices` of every step, on `device`: made on the host a block of steps at a time and copied ahead
    (asynchronously, from pinned memory on CUDA), so that a step reads its batch without a host round trip."""

    def __init__(self, *, seed: int, batch_size: int, num_examples: int, device: torch.device, block: int = 256):
        self.seed, self.batch_size, self.num_examples = seed, batch_size, num_examples
        self.device, self.block = device, block
        self.start, self.rows = None, None

    def __call__(self, step: int) -> torch.Tensor:
        """LongTensor [batch_size] on the device: the examples of `step`."""
        if self.start is None or not self.start <= step < self.start + self.block:
            rows = torch.stack([batch_indices(s, seed=self.seed, batch_size=self.batch_size,
                                              num_examples=self.num_examples)
                                for s in range(step, step + self.block)])
            if self.device.type == "cuda":
                rows = rows.pin_memory()
            self.start, self.rows = step, rows.to(self.device, non_blocking=True)
        return self.rows[step - self.start]


class StreamedSplit:
    """The training batches of a split read on the host (`data.lm.TokenRows`: int64 rows [n, T + 1] of a memory-
    mapped token file). `split(step)` reads the rows of `step` (`batch_indices`, as for a DeviceSplit) into one
    device buffer [batch_size, T + 1] and returns arange(batch_size); `TrainStep` then gathers from this object as
    from a DeviceSplit (input_ids = buffer[:, :-1], labels = buffer[:, 1:], every position scored), so a CUDA
    graph captured on the buffer replays on each step's rows.

    On CUDA the rows go through a ring of RING pinned host buffers and are copied asynchronously, in stream order
    after the previous step; the host waits only for the copy made RING steps ago, so it still runs ahead.
    """

    RING = 4

    def __init__(self, rows, *, seed: int, batch_size: int, device: torch.device):
        self.rows, self.seed, self.batch_size = rows, seed, batch_size
        self.buffer = torch.zeros(batch_size, rows.seq_len + 1, dtype=torch.long, device=device)
        self.input_ids, self.labels = self.buffer[:, :-1], self.buffer[:, 1:]   # [batch_size, T] views
        self.positions, self.slices = None, {}
        self.all_rows = torch.arange(batch_size, device=device)
        self.cuda = device.type == "cuda"
        # on the CPU the rows are read straight into the buffer
        self.staging = [torch.zeros_like(self.buffer, device="cpu").pin_memory() for _ in range(self.RING)] \
            if self.cuda else [self.buffer]
        self.copied = [None] * len(self.staging)   # the CUDA event after each staging buffer's last copy

    def __len__(self) -> int:
        return self.batch_size

    def batch(self, index):
        """(input_ids [b, T], None, labels [b, T]) of the buffer's rows `index`."""
        return self.input_ids[index], None, self.labels[index]

    def __call__(self, step: int) -> torch.Tensor:
        """Loads the rows of `step` into the buffer; returns LongTensor [batch_size] on the device: all of them."""
        slot = step % len(self.staging)
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()   # its previous copy has left it
        index = batch_indices(step, seed=self.seed, batch_size=self.batch_size, num_examples=len(self.rows))
        self.rows.read(index.numpy(), out=self.staging[slot].numpy())
        if self.cuda:
            self.buffer.copy_(self.staging[slot], non_blocking=True)
            self.copied[slot] = torch.cuda.Event()
            self.copied[slot].record()
        return self.all_rows
