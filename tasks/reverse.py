"""Reverse: copy's layout, but the answer is the string reversed (see tasks/copy.py for the vocabulary)."""
from dataclasses import dataclass

from .copy import CopyConfig, generate_copy


@dataclass
class ReverseConfig(CopyConfig):
    """Same fields as CopyConfig: vocab_size, seq_len (>= 2 * copy_len), copy_len."""


def generate_reverse(config: ReverseConfig, seed: int, num_examples: int) -> dict:
    """Returns input_ids, labels [num_examples, seq_len] and copy_len [num_examples] (int64 numpy).

    Example (vocab_size=8, seq_len=8, copy_len=4), row and labels (-100 shown as .):
        input_ids  5 2 7 3 | 1 3 7 2        (string, SEP, reversed string[:-1])
        labels     . . . . | 3 7 2 5
    """
    return generate_copy(config, seed, num_examples, reverse=True)
