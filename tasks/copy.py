"""Copy (and, with reverse=True, reverse): a random token string, a separator, then the string again.

Vocabulary: 0 = PAD, 1 = SEP, string tokens are uniform over [2, vocab_size).
"""
from dataclasses import dataclass

import numpy as np

from .common import answer_after_separator

PAD = 0
SEP = 1


@dataclass
class CopyConfig:
    """vocab_size: model vocabulary (every id < vocab_size); seq_len: input length, at least 2 * copy_len (the
    positions after the answer hold PAD, unscored); copy_len: tokens in the string to reproduce."""
    vocab_size: int = 16
    seq_len: int = 32
    copy_len: int = 16

    def __post_init__(self):
        self.validate()

    def validate(self):
        if self.copy_len < 1:
            raise ValueError(f"copy_len={self.copy_len} must be >= 1")
        if self.vocab_size < 3:
            raise ValueError(f"vocab_size={self.vocab_size} is too small: need >= 3 (PAD, SEP and a string token)")
        if self.seq_len < 2 * self.copy_len:
            raise ValueError(f"seq_len={self.seq_len} is too short for copy_len={self.copy_len}: "
                             f"need seq_len >= 2 * copy_len = {2 * self.copy_len}")


def generate_copy(config: CopyConfig, seed: int, num_examples: int, *, reverse: bool = False) -> dict:
    """Returns input_ids, labels [num_examples, seq_len] and copy_len [num_examples] (int64 numpy).

    Example (vocab_size=8, seq_len=8, copy_len=4), row and labels (-100 shown as .):
        input_ids  5 2 7 3 | 1 5 2 7        (string, SEP, string[:-1])
        labels     . . . . | 5 2 7 3        (reverse=True: 3 7 2 5, input SEP 3 7 2)
    """
    rng = np.random.default_rng(seed)
    string = rng.integers(SEP + 1, config.vocab_size, size=(num_examples, config.copy_len))
    answer = string[:, ::-1] if reverse else string
    input_ids, labels = answer_after_separator(string, answer, SEP, config.seq_len, PAD)
    return {"input_ids": input_ids, "labels": labels,
            "copy_len": np.full(num_examples, config.copy_len, dtype=np.int64)}
