"""Evaluation on a held-out split: loss, token accuracy on scored positions, whole-sequence exact match,
and accuracy per value of each slice column a task provides (e.g. num_kv_pairs)."""
from contextlib import nullcontext

import torch

from gdn_exp.ops import cross_entropy_loss
from tasks import IGNORE_INDEX


def lm_loss(logits, labels, reduction="mean"):
    """Cross-entropy over scored positions (`ops.cross_entropy_loss`). logits [B, T, V], labels [B, T] (-100: not
    scored)."""
    return cross_entropy_loss(logits.flatten(0, 1), labels.flatten(), IGNORE_INDEX, reduction)


@torch.no_grad()
def evaluate(model, split, *, batch_size: int, autocast=nullcontext, prefix: str = "test") -> dict:
    """Metrics of `model` on `split` (a `train.data.DeviceSplit`), keyed `prefix/...`. The counts stay on the
    device until the whole split has run: one transfer to the host, not one per batch."""
    was_training = model.training
    model.eval()
    n = len(split)
    device = split.input_ids.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    ex_correct = torch.zeros(n, device=device, dtype=torch.long)  # per example: correct and scored positions
    ex_scored = torch.zeros(n, device=device, dtype=torch.long)
    for i in range(0, n, batch_size):
        x, positions, y = split.batch(slice(i, i + batch_size))
        with autocast():
            logits = model(x, positions=positions)
        mask = y != IGNORE_INDEX
        loss_sum += lm_loss(logits, y, reduction="sum")
        ex_correct[i : i + batch_size] = ((logits.argmax(-1) == y) & mask).sum(1)
        ex_scored[i : i + batch_size] = mask.sum(1)
    model.train(was_training)
    ex_correct, ex_scored, loss_sum = ex_correct.cpu(), ex_scored.cpu(), loss_sum.item()
    correct, scored = ex_correct.sum().item(), ex_scored.sum().item()
    metrics = {f"{prefix}/loss": loss_sum / max(scored, 1), f"{prefix}/accuracy": correct / max(scored, 1),
               f"{prefix}/exact_match": (ex_correct == ex_scored).sum().item() / max(n, 1)}
    for key, column in sorted(split.slices.items()):
        for value in column.unique().tolist():
            sel = column == value
            metrics[f"{prefix}/accuracy/{key}={value}"] = ex_correct[sel].sum().item() / max(
                ex_scored[sel].sum().item(), 1)
    return metrics


def evaluate_splits(model, splits: dict, **kwargs) -> dict:
    """`evaluate` on splits["test"] (keys test/...) and on each longer test split "test@L" of task.test_lengths
    (keys test/...@L, e.g. test/accuracy@256). kwargs: as for `evaluate`."""
    metrics = evaluate(model, splits["test"], **kwargs)
    for name, split in splits.items():
        if name.startswith("test@"):
            length = name.removeprefix("test@")
            metrics.update({f"{key}@{length}": value for key, value in evaluate(model, split, **kwargs).items()})
    return metrics


def reached_target(metrics: dict, target) -> bool:
    """Whether test/accuracy and the accuracy at every longer test length (test/accuracy@L) are >= target (None:
    never): a task with longer test lengths counts as solved only once it generalises to all of them."""
    return target is not None and all(value >= target for key, value in metrics.items()
               if key == "test/accuracy" or key.startswith("test/accuracy@"))
