"""The gated delta rule's PyTorch forms, where DESIGN.md promises them: the float64-capable token-by-token oracle
and the chunkwise form live in `gdn_exp.ops.gated_delta_rule.reference`."""
from gdn_exp.ops.gated_delta_rule.reference import chunk_gated_delta_rule, recurrent_gated_delta_rule

__all__ = ["chunk_gated_delta_rule", "recurrent_gated_delta_rule"]
