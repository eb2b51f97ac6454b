"""The loss's PyTorch form: the reference of `kernel.py` and the path on CPU."""
import torch
import torch.nn.functional as F


def cross_entropy(logits, labels, ignore_index: int, reduction: str):
    """torch's cross-entropy on logits [N, V] in at least float32 (float64 stays float64) against labels [N]."""
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels,
                           ignore_index=ignore_index, reduction=reduction)
