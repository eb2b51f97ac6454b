"""SwiGLU's PyTorch form: the reference of `kernel.py` and the path on CPU."""
import torch.nn.functional as F


def swiglu(a, b):
    """h = silu(a) * b; a, b: any equal shapes."""
    return F.silu(a) * b
