"""Layers of gdn-exp: token mixers (Gated DeltaNet, attention), the short convolution and the SwiGLU MLP."""
from .attention import Attention
from .conv import ShortConvolution
from .gated_deltanet import GatedDeltaNet
from .mlp import SwiGLU, swiglu_hidden_size

__all__ = ["Attention", "GatedDeltaNet", "ShortConvolution", "SwiGLU", "swiglu_hidden_size"]
