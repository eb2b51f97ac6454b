"""The language-model loss, cross-entropy over the vocabulary:

    kernel.py      the Triton form: reads the logits in their dtype, keeps only logsumexp per row
    reference.py   torch's cross-entropy on float32 logits (its reference; the path on CPU)
"""
from gdn_exp.ops.backend import resolve_backend

from . import reference


def cross_entropy_loss(logits, labels, ignore_index: int = -100, reduction: str = "mean", backend: str = "auto"):
    """Cross-entropy of logits [N, V] against labels [N] (ignore_index: not scored), "mean" over the scored rows
    or "sum", in float32 whatever the logits' dtype; the gradient comes in the logits' dtype.

    backend "triton" (CUDA by default) never makes a float32 copy of the logits; "torch" runs F.cross_entropy on
    float32 logits.
    """
    if resolve_backend(backend, logits.device) == "triton":
        from .kernel import triton_cross_entropy  # imports Triton, which is Linux-only

        return triton_cross_entropy(logits, labels, ignore_index, reduction)
    return reference.cross_entropy(logits, labels, ignore_index, reduction)
