"""The ops, one folder each, every one a Triton form (`kernel.py` or, for the gated delta rule, `chunk.py` and
`recurrent.py`), its PyTorch reference (`reference.py`) and one public function that takes `backend=`
(`backend.py`: "auto" runs Triton on CUDA, PyTorch elsewhere):

    gated_delta_rule    the recurrence S <- exp(g) S + k beta (v - S^T k)^T, o = S^T q (and the no-delta form)
    short_conv          causal depthwise conv + SiLU + per-head L2 norms (the GDN layer's q, k, v)
    gated_norm          RMSNorm with a SiLU gate (the layer's output), and the residual add + RMSNorm (the model)
    swiglu              silu(a) * b (the MLP)
    cross_entropy       the language-model loss

Layers and the model call only these functions.
"""
from .backend import BACKENDS, KernelUnavailableError, resolve_backend, triton_available
from .cross_entropy import cross_entropy_loss
from .gated_delta_rule import MODES, decode_step, gated_delta_rule, gated_linear_attention
from .gated_norm import add_rms_norm, gated_rms_norm
from .short_conv import short_conv_silu
from .swiglu import swiglu

__all__ = ["BACKENDS", "KernelUnavailableError", "MODES", "add_rms_norm", "cross_entropy_loss", "decode_step",
           "gated_delta_rule", "gated_linear_attention", "gated_rms_norm", "resolve_backend", "short_conv_silu",
           "swiglu", "triton_available"]
