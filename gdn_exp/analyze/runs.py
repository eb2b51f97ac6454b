"""A trained run in one line, and the inputs of every mixer layer on a batch of its test examples.

    run = load_run("outputs/runs/<run dir>")      # model (eval mode), resolved config, test split
    trace = run.trace(run.examples(4))            # one forward pass with each layer's op inputs recorded
    A = trace.layers[0].attention()               # [B, H, T, T] implicit attention (softmax map for attention)

Each layer calls its `record` hook (`GatedDeltaNet`, `Attention`) with the tensors it passes to its op; `trace`
sets the hooks for one forward pass and removes them, so the maps are computed from exactly what the layer used.
"""
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

import tasks
from gdn_exp import longcontext
from gdn_exp.data import (LMTaskConfig, PackedDocuments, document_cu_seqlens, load_lm_splits, make_tokenizer,
                          task_params)
from gdn_exp.nn import GatedDeltaNet
from gdn_exp.nn.attention import attention_mask
from gdn_exp.ops.reference import recurrent_gated_delta_rule
from gdn_exp.train import checkpoint

from . import maps


@dataclass
class Layer:
    """One mixer layer's op inputs on a batch, as float64 copies.

    kind: "gdn" or "attention"; q, k: [B, T, H, K] (attention: after the rotary embedding); v: [B, T, H, V];
    g (log decay), beta: [B, T, H] (gdn only); use_delta: False for the no_delta ablation (gdn); window: the
    attention layer's sliding window (None: full causal); sequence_ids: [B, T] document numbers of packed documents
    (task=lm with varlen), or None.
    """

    index: int
    kind: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    g: Optional[torch.Tensor] = None
    beta: Optional[torch.Tensor] = None
    use_delta: bool = True
    window: Optional[int] = None
    sequence_ids: Optional[torch.Tensor] = None

    @property
    def num_heads(self) -> int:
        return self.q.shape[2]

    @property
    def alpha(self) -> torch.Tensor:
        """The decay α = exp(g) per token and head, [B, T, H] (1 without a gate)."""
        return self.g.exp()

    @property
    def memory_length(self) -> torch.Tensor:
        """1 / (1 − α) [B, T, H]: about the number of tokens over which the decay alone shrinks a memory by e
        (inf at α = 1)."""
        return 1 / (1 - self.alpha)

    def attention(self) -> torch.Tensor:
        """[B, H, T, T] float64: `maps.implicit_attention` of a GDN layer, `maps.softmax_attention` of an attention
        layer."""
        if self.kind == "gdn":
            return maps.implicit_attention(self.q, self.k, self.g, self.beta, scale=self.scale,
                                           use_delta=self.use_delta, sequence_ids=self.sequence_ids)
        return maps.softmax_attention(self.q, self.k, scale=self.scale, window=self.window,
                                      sequence_ids=self.sequence_ids)

    def output(self) -> torch.Tensor:
        """What the layer's op computes from these inputs, independently of `attention`: [B, T, H, V] float64 (GDN:
        the token-by-token oracle; attention: torch's scaled_dot_product_attention)."""
        B, T, H, _ = self.q.shape
        if self.kind == "gdn":
            cu_seqlens = None if self.sequence_ids is None else sequence_boundaries(self.sequence_ids)
            flat = (lambda x: x.reshape(1, B * T, *x.shape[2:])) if cu_seqlens is not None else (lambda x: x)
            o, _ = recurrent_gated_delta_rule(*(flat(x) for x in (self.q, self.k, self.v, self.g, self.beta)),
                                              scale=self.scale, cu_seqlens=cu_seqlens, use_delta=self.use_delta)
            return o.reshape(B, T, H, -1)
        positions = torch.arange(T, device=self.q.device)
        mask = attention_mask(positions, positions, self.window) & maps.same_sequence(self.sequence_ids, T,
                                                                                      self.q.device)
        q, k, v = (x.transpose(1, 2) for x in (self.q, self.k, self.v))      # [B, H, T, D]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale).transpose(1, 2)

    def reconstruction_error(self, A: Optional[torch.Tensor] = None) -> float:
        """max |Σ_s A[t, s] v_s − o_t| / max |o_t| over the batch: how exactly the map accounts for the output."""
        A = self.attention() if A is None else A
        o = self.output()
        return ((maps.apply_attention(A, self.v) - o).abs().max() / o.abs().max().clamp_min(1e-300)).item()

    def states(self) -> torch.Tensor:
        """Every state S_t, [B, T, H, K, V] float64 (GDN layers; `maps.gdn_states`)."""
        return maps.gdn_states(self.k, self.v, self.g, self.beta, use_delta=self.use_delta,
                               sequence_ids=self.sequence_ids)

    def state_statistics(self) -> dict:
        """{norm, effective_rank, update, erased}: [B, T, H] each (GDN layers; `maps.state_statistics`)."""
        return maps.state_statistics(self.k, self.v, self.g, self.beta, use_delta=self.use_delta,
                                     sequence_ids=self.sequence_ids)


def sequence_boundaries(sequence_ids: torch.Tensor) -> torch.Tensor:
    """cu_seqlens [N + 1] of the documents numbered by sequence_ids [B, T], the rows laid end to end."""
    flat = sequence_ids.reshape(-1)
    starts = torch.nonzero(torch.diff(flat, prepend=flat[:1] - 1)).flatten()
    return torch.cat([starts, torch.tensor([len(flat)], device=flat.device)])


@dataclass
class Trace:
    """One forward pass over a batch: input_ids, labels [B, T]; logits [B, T, vocab] (float32); one Layer per
    model layer, in order."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor
    layers: list

    @property
    def correct(self) -> torch.Tensor:
        """BoolTensor [B, T]: the model's argmax is the label (False where unscored)."""
        return (self.logits.argmax(-1) == self.labels) & (self.labels != tasks.IGNORE_INDEX)


@contextmanager
def recording(model):
    """Sets every mixer's `record` hook for the duration; yields the list the hooks fill, one dict per layer."""
    records = [None] * len(model.blocks)

    def keep(index):
        def record(inputs):
            records[index] = {name: x.detach().to("cpu", torch.float64) if torch.is_tensor(x) else x
                              for name, x in inputs.items()}
        return record

    for i, block in enumerate(model.blocks):
        block.mixer.record = keep(i)
    try:
        yield records
    finally:
        for block in model.blocks:
            block.mixer.record = None


class Run:
    """A trained run: `path`, `model` (eval mode), the resolved `config` (dict) and its `test` split.

    test: {"input_ids", "labels": LongTensor [N, T], plus the task's slice columns [N]}, regenerated from the run's
    own config and seed (task=lm: re-read and packed), so example i is the run's test example i.
    """

    def __init__(self, path: Path, model, config: dict, test: dict, checkpoint: str):
        self.path, self.model, self.config, self.test, self.checkpoint = path, model, config, test, checkpoint

    @property
    def task(self) -> str:
        return self.config["task"]["name"]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def label(self) -> str:
        """The mixer and its switched-off components, e.g. "gdn [use_delta=False]" (`longcontext.model_label`)."""
        return longcontext.model_label(self.config["model"])

    @property
    def packed(self) -> bool:
        """True when the model trained on packed documents (task.varlen): it runs on them the same way."""
        return self.config["task"].get("varlen", False)

    def examples(self, n: int, start: int = 0) -> dict:
        """Test examples start..start+n-1: {column: tensor[n, ...]}."""
        return {name: column[start : start + n] for name, column in self.test.items()}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab] (float32) of input_ids [B, T], run as in training (packed documents if `packed`)."""
        input_ids = input_ids.to(self.device)
        with torch.no_grad():
            if self.packed:
                bos_id = make_tokenizer(self.config["task"]["tokenizer"]).bos_id
                return PackedDocuments(self.model, bos_id)(input_ids).float().cpu()
            return self.model(input_ids).float().cpu()

    def trace(self, batch: dict) -> Trace:
        """The forward pass over batch["input_ids"] [B, T] with every layer's op inputs recorded."""
        input_ids = batch["input_ids"]
        B, T = input_ids.shape
        with recording(self.model) as records:
            logits = self.forward(input_ids)
        sequence_ids = None
        if self.packed:
            bos_id = make_tokenizer(self.config["task"]["tokenizer"]).bos_id
            starts = torch.zeros(B * T, dtype=torch.long)
            starts[document_cu_seqlens(input_ids, bos_id)[:-1]] = 1
            sequence_ids = starts.cumsum(0).reshape(B, T)
        layers = []
        for i, (block, record) in enumerate(zip(self.model.blocks, records)):
            # packed documents ran as one row [1, B * T]: back to [B, T, ...]
            tensors = {name: x.reshape(B, T, *x.shape[2:]) for name, x in record.items() if torch.is_tensor(x)}
            if isinstance(block.mixer, GatedDeltaNet):
                layers.append(Layer(i, "gdn", scale=record["scale"], use_delta=block.mixer.use_delta,
                                    sequence_ids=sequence_ids, **tensors))
            else:
                layers.append(Layer(i, "attention", scale=record["scale"], window=record["window"],
                                    sequence_ids=sequence_ids, **tensors))
        return Trace(input_ids, batch["labels"], logits, layers)


def load_test_split(config: dict) -> dict:
    """The test split a run evaluated on, from its resolved config: {"input_ids", "labels": [N, T], slices: [N]}."""
    task = config["task"]
    if task["name"] == "lm":
        return load_lm_splits(LMTaskConfig(**task), cache_dir=config["task_cache_dir"])["test"]
    return tasks.make_task(task["name"], seed=tasks.task_seed(config["seed"], "test"), num_examples=task["num_test"],
                           **task_params(task))


def load_run(path, device: str = "cpu") -> Run:
    """The run in directory `path`: its weights (checkpoints/best.pt, else latest.pt or previous.pt: the first
    that loads), resolved config and test split.
    Raises ValueError when it has no checkpoint (a failed run)."""
    path = Path(path)
    weights, state = checkpoint.load_weights(path)
    model, config = longcontext.model_of(state)
    return Run(path, model.to(device), config, load_test_split(config), weights.name)
