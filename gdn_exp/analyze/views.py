"""Task-aware views: where each answer comes from, whether a layer's map points there, accuracy by distance, and
the loss by position of a language model.

Layouts (tasks/<name>.py): mqar puts its key-value pairs first and queries each key again later, the label at a
query being the key's value; needle hides key-value needles in a haystack and queries some at the end; copy and
reverse emit a string after a separator; selective_copy emits, in order, the data tokens scattered in its context.
"""
import numpy as np
import torch
import torch.nn.functional as F

import tasks

RECALL_TASKS = ("mqar", "needle")
COPY_TASKS = ("copy", "reverse", "selective_copy")


def answer_sources(task: dict, input_ids: torch.Tensor, labels: torch.Tensor) -> dict:
    """For each scored position t, where its answer comes from: {name: LongTensor [B, T]}, −1 where unscored.

        mqar, needle     "key": where the queried key input_ids[t] stands in the pairs / haystack,
                         "source": the position after it, the key's value
        copy, reverse    "source": the position of the string token to emit
        selective_copy   "source": the position of the i-th data token of the context, for the i-th answer
        other (lm)       {}

    task: the run's resolved task config (name and parameters).
    """
    name = task["name"]
    B, T = input_ids.shape
    scored = labels != tasks.IGNORE_INDEX
    t = torch.arange(T).expand(B, T)
    if name in RECALL_TASKS:
        context = recall_context(task, T)
        # keys are distinct within the context and no other context token equals a key: the first match is the key
        match = input_ids[:, None, :context] == input_ids[:, :, None]         # [B, T, context]
        key = match.int().argmax(-1).masked_fill(~scored, -1)
        return {"key": key, "source": (key + 1).masked_fill(~scored, -1)}
    if name in ("copy", "reverse"):
        L = task["copy_len"]  # string at 0..L−1, the separator at L predicts string[0] (or string[L−1])
        source = t - L if name == "copy" else 2 * L - 1 - t
        return {"source": source.masked_fill(~scored, -1)}
    if name == "selective_copy":
        context = T - task["num_tokens"]
        is_data = input_ids[:, :context] >= 1 + task["num_noise_tokens"]
        data_positions = is_data.nonzero()[:, 1].reshape(B, task["num_tokens"])   # row-major: in order per row
        source = torch.full((B, T), -1, dtype=torch.long)
        source[:, context:] = data_positions
        return {"source": source.masked_fill(~scored, -1)}
    return {}


def recall_context(task: dict, T: int) -> int:
    """The number of leading positions that hold the key-value pairs of a recall task: mqar's pairs, needle's
    haystack."""
    return 2 * task["num_kv_pairs"] if task["name"] == "mqar" else T - 2 * task["num_queries"]


def recall_rows(A: torch.Tensor, sources: dict, context: int) -> tuple:
    """Each query's row of A over the context, scaled by its largest |A| there: ([Q, H, context], key [Q],
    value [Q]), the queries of every example in order. A [B, H, T, T]; sources from `answer_sources`."""
    b, t = (sources["key"] >= 0).nonzero(as_tuple=True)
    rows = A[b, :, t, :context]                                                 # [Q, H, context]
    rows = rows / rows.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    return rows, sources["key"][b, t], sources["source"][b, t]


def alignment(A: torch.Tensor, source: torch.Tensor) -> tuple:
    """Which token each scored position draws most from: A [B, H, T, T], source [B, T] (−1: unscored) ->
    (hit rate [H]: the share of scored positions whose argmax_s A[t, s] is their source; argmax [B, H, T])."""
    argmax = A.argmax(-1)                                                      # [B, H, T]
    scored = source >= 0
    hits = (argmax == source[:, None]) & scored[:, None]
    return hits.sum((0, 2)) / scored.sum().clamp_min(1), argmax


def profile_around(A: torch.Tensor, anchor: torch.Tensor, width: int) -> torch.Tensor:
    """The mean share |A[t, anchor_t + o]| / Σ_s |A[t, s]| over scored positions t, for offsets o = −width..width:
    [H, 2 width + 1] (NaN where no scored position has that offset inside the sequence). A [B, H, T, T];
    anchor [B, T], −1 where unscored."""
    H, T = A.shape[1], A.shape[-1]
    share = A.abs() / A.abs().sum(-1, keepdim=True).clamp_min(1e-300)
    b, t = (anchor >= 0).nonzero(as_tuple=True)
    s = anchor[b, t][:, None] + torch.arange(-width, width + 1)               # [P, 2w + 1]
    inside = (s >= 0) & (s <= t[:, None])
    picked = share[b, :, t].gather(-1, s.clamp(0, T - 1)[:, None].expand(-1, H, -1))   # [P, H, 2w + 1]
    profile = (picked * inside[:, None]).sum(0) / inside.sum(0).clamp_min(1)
    profile[:, ~inside.any(0)] = float("nan")
    return profile


def accuracy_by_distance(run, max_examples: int = 1000, batch_size: int = 128) -> dict:
    """Per scored test position of the first max_examples test examples: {"distance": t − key position (recall
    tasks) or t − source position, "correct": whether the model's argmax is the label} (numpy arrays); {} for a task
    without sources."""
    if run.task not in RECALL_TASKS + COPY_TASKS:
        return {}
    distances, correct = [], []
    for start in range(0, min(max_examples, len(run.test["input_ids"])), batch_size):
        batch = run.examples(min(batch_size, max_examples - start), start)
        sources = answer_sources(run.config["task"], batch["input_ids"], batch["labels"])
        anchor = sources.get("key", sources["source"])
        b, t = (anchor >= 0).nonzero(as_tuple=True)
        predicted = run.forward(batch["input_ids"]).argmax(-1)
        distances.append((t - anchor[b, t]).numpy())
        correct.append((predicted[b, t] == batch["labels"][b, t]).numpy())
    return {"distance": np.concatenate(distances), "correct": np.concatenate(correct)}


def loss_by_position(run, max_examples: int = 256, batch_size: int = 32) -> np.ndarray:
    """The model's mean cross-entropy at each position over the first max_examples test rows: [T] (NaN where no
    row is scored)."""
    total = count = 0
    for start in range(0, min(max_examples, len(run.test["input_ids"])), batch_size):
        batch = run.examples(min(batch_size, max_examples - start), start)
        logits = run.forward(batch["input_ids"])
        labels = batch["labels"]
        loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=tasks.IGNORE_INDEX, reduction="none")
        total = total + loss.sum(0)
        count = count + (labels != tasks.IGNORE_INDEX).sum(0)
    return (total / count).numpy()
