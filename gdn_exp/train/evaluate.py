"""Evaluation on a held-out split: loss, token accuracy on scored positions, whole-sequence exact match,
and accuracy per value of each slice column a task provides (e.g. num_kv_pairs)."""
from collections import defaultdict
from contextlib import nullcontext

import torch

from gdn_exp.ops import cross_entropy_loss

IGNORE_INDEX = -100


def lm_loss(logits, labels, reduction="mean"):
    """Cross-entropy over scored positions (`ops.cross_entropy_loss`). logits [B, T, V], labels [B, T] (-100: not
    scored)."""
    return cross_entropy_loss(logits.flatten(0, 1), labels.flatten(), IGNORE_INDEX, reduction)


@torch.no_grad()
def evaluate(model, split: dict, *, batch_size: int, device, autocast=nullcontext, prefix: str = "test") -> dict:
    """Metrics of `model` on `split` ({"input_ids", "labels", optional slice columns}), keyed `prefix/...`."""
    was_training = model.training
    model.eval()
    slice_keys = [k for k in split if k not in ("input_ids", "labels")]
    loss_sum = correct = scored = exact = 0.0
    per_slice = defaultdict(lambda: [0.0, 0.0])  # (key, value) -> [correct, scored]
    n = len(split["input_ids"])
    for i in range(0, n, batch_size):
        x = split["input_ids"][i : i + batch_size].to(device)
        y = split["labels"][i : i + batch_size].to(device)
        with autocast():
            logits = model(x)
        mask = y != IGNORE_INDEX
        hits = (logits.argmax(-1) == y) & mask
        loss_sum += lm_loss(logits, y, reduction="sum").item()
        ex_correct, ex_scored = hits.sum(1).cpu(), mask.sum(1).cpu()
        correct += ex_correct.sum().item()
        scored += ex_scored.sum().item()
        exact += (ex_correct == ex_scored).sum().item()
        for key in slice_keys:
            for value in split[key][i : i + batch_size].unique().tolist():
                sel = split[key][i : i + batch_size] == value
                per_slice[key, value][0] += ex_correct[sel].sum().item()
                per_slice[key, value][1] += ex_scored[sel].sum().item()
    model.train(was_training)
    metrics = {f"{prefix}/loss": loss_sum / max(scored, 1), f"{prefix}/accuracy": correct / max(scored, 1),
               f"{prefix}/exact_match": exact / max(n, 1)}
    for (key, value), (c, s) in sorted(per_slice.items()):
        metrics[f"{prefix}/accuracy/{key}={value}"] = c / max(s, 1)
    return metrics
