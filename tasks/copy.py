"""Copy (and, with reverse=True, reverse): a random token string, a separator, then the string again.

Vocabulary: 0 = PAD, 1 = SEP, string tokens are uniform over [2, vocab_size).
"""
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .common import answer_after_separator, check_minimum

PAD = 0
SEP = 1


@dataclass
class CopyConfig:
    """vocab_size: model vocabulary (every id < vocab_size); seq_len: input length, at least 2 * copy_len (the
    positions after the answer hold PAD, unscored); copy_len: tokens in the string to reproduce."""
    vocab_size: int = 16
    seq_len: int = 32
    copy_len: int = 16
    LENGTH_SCALED: ClassVar[tuple] = ("copy_len",)  # grown with seq_len by tasks.at_length

    def __post_init__(self):
        self.validate()

    def validate(self):
        check_minimum("copy_len", self.copy_len, 1)
        check_minimum("vocab_size", self.vocab_size, 3, "PAD, SEP and one string token")
        check_minimum("seq_len", self.seq_len, 2 * self.copy_len, f"2 * copy_len (copy_len={self.copy_len})")


def generate_copy(config: CopyConfig, seed: int, num_examples: int, *, reverse: bool = False) -> dict:
    """Returns input_ids, labels [num_examples, seq_len] and copy_len [num_examples] (int64 numpy).

    >>> batch = generate_copy(CopyConfig(vocab_size=8, seq_len=8, copy_len=4), seed=2, num_examples=1)
    >>> print(*batch["input_ids"][0])  # string, SEP, string[:-1]
    7 3 2 3 1 7 3 2
    >>> print(*batch["labels"][0])
    -100 -100 -100 -100 7 3 2 3
    """
    rng = np.random.default_rng(seed)
    string = rng.integers(SEP + 1, config.vocab_size, size=(num_examples, config.copy_len))
    answer = string[:, ::-1] if reverse else string
    input_ids, labels = answer_after_separator(string, answer, SEP, config.seq_len, PAD)
    return {"input_ids": input_ids, "labels": labels,
            "copy_len": np.full(num_examples, config.copy_len, dtype=np.int64)}
