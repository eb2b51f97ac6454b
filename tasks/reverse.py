"""Reverse: copy's layout, but the answer is the string reversed (see tasks/copy.py for the vocabulary)."""
from dataclasses import dataclass

from .copy import CopyConfig, generate_copy


@dataclass
class ReverseConfig(CopyConfig):
    """Same fields as CopyConfig: vocab_size, seq_len (>= 2 * copy_len), copy_len."""


def generate_reverse(config: ReverseConfig, seed: int, num_examples: int) -> dict:
    """Returns input_ids, labels [num_examples, seq_len] and copy_len [num_examples] (int64 numpy).

    >>> batch = generate_reverse(ReverseConfig(vocab_size=8, seq_len=8, copy_len=4), seed=2, num_examples=1)
    >>> print(*batch["input_ids"][0])  # string, SEP, reversed string[:-1]
    7 3 2 3 1 3 2 3
    >>> print(*batch["labels"][0])
    -100 -100 -100 -100 3 2 3 7
    """
    return generate_copy(config, seed, num_examples, reverse=True)
