"""Parity: a bit string of random length; after its last bit, predict whether it holds an odd number of ones.

The formal-language setup of Grazzi et al. (ICLR 2025, "Unlocking State-Tracking in Linear RNNs Through Negative
Eigenvalues"), taken from the xLSTM paper's code: vocabulary 3 (0 = PAD, 1 = bit 0, 2 = bit 1), lengths drawn
uniformly, the answer (the bit token of the parity: 1 even, 2 odd) scored at the last bit only, no end marker, PAD
after it. Training lengths are [min_len, seq_len]; a test at a longer length L (task.test_lengths, tasks.at_length)
draws from [seq_len, L], as the paper tests on 40-256 after training on 3-40. Our length counts the bits, theirs
also the answer slot (their 3-40 is our 2-39 bits): the defaults keep the numbers, one bit longer.
"""
from dataclasses import dataclass

import numpy as np

from .common import answer_at_end, check_length_range, check_minimum

PAD = 0
BIT = 1  # token of bit b: BIT + b


@dataclass
class ParityConfig:
    """vocab_size: model vocabulary, at least 3; seq_len: the longest example (input width); min_len: the shortest
    (lengths uniform in [min_len, seq_len])."""
    vocab_size: int = 3
    seq_len: int = 40
    min_len: int = 3

    def __post_init__(self):
        self.validate()

    def validate(self):
        check_minimum("vocab_size", self.vocab_size, 3, "PAD and the two bits")
        check_length_range(self.min_len, self.seq_len)


def generate_parity(config: ParityConfig, seed: int, num_examples: int) -> dict:
    """Returns input_ids, labels [num_examples, seq_len] (int64 numpy).

    >>> batch = generate_parity(ParityConfig(seq_len=8, min_len=5), seed=4, num_examples=2)
    >>> print(*batch["input_ids"][0])  # 7 bits, all ones, then PAD
    2 2 2 2 2 2 2 0
    >>> print(*batch["labels"][0])  # odd: the token of bit 1, at the last bit
    -100 -100 -100 -100 -100 -100 2 -100
    >>> print(*batch["input_ids"][1])  # 8 bits 0 1 0 0 1 1 1 0: four ones
    1 2 1 1 2 2 2 1
    >>> print(*batch["labels"][1])  # even: the token of bit 0
    -100 -100 -100 -100 -100 -100 -100 1
    """
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, size=(num_examples, config.seq_len))
    lengths = rng.integers(config.min_len, config.seq_len + 1, size=num_examples)
    ones = np.where(np.arange(config.seq_len) < lengths[:, None], bits, 0).sum(1)
    input_ids, labels = answer_at_end(BIT + bits, lengths, BIT + ones % 2, PAD)
    return {"input_ids": input_ids, "labels": labels}
