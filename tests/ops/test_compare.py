"""ops.compare: the relative error every kernel test uses."""
import torch

from gdn_exp.ops.compare import compare


def test_values_below_the_dtypes_range_count_against_its_smallest_normal():
    """float16 flushes a gradient of ~1e-12 to 0: no float16 result can do better, so that is no failure;
    float32 can hold it, so 0 is."""
    ref = {"dg": torch.full((4, 8), 1e-12, dtype=torch.float64)}
    assert compare({"dg": torch.zeros(4, 8, dtype=torch.float16)}, ref, 1e-2) == []
    assert compare({"dg": torch.zeros(4, 8, dtype=torch.float32)}, ref, 1e-2) == ["dg"]


def test_errors_at_representable_magnitudes_still_fail():
    ref = {"o": torch.ones(4, 8, dtype=torch.float64)}
    assert compare({"o": torch.ones(4, 8, dtype=torch.float16)}, ref, 1e-2) == []
    assert compare({"o": torch.full((4, 8), 1.1, dtype=torch.float16)}, ref, 1e-2) == ["o"]
    assert compare({"o": torch.full((4, 8), float("nan"))}, ref, 1e-2) == ["o"]
