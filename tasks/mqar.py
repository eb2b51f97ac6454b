"""Multi-query associative recall (MQAR, as in Zoology): key-value pairs, then every key queried again.

Vocabulary: keys are drawn from [1, vocab_size // 2), values from [vocab_size // 2, vocab_size), both without
replacement within an example. The sequence starts with the 2 * num_kv_pairs pairs `k v k v ...`; the rest is the
query region. Each key appears once in it, at an even offset 2 * gap whose gap (0-based) is drawn without
replacement from p(gap) ∝ (gap + 1) ** (power_a - 1), a power law that puts most queries close to the pairs. The
label at a query key is its value. Every other query-region position is filler: a uniform random token from the
whole vocabulary (random_non_queries=True) or 0, never scored.
"""
from dataclasses import dataclass

import numpy as np

from .common import IGNORE_INDEX, choose_without_replacement


@dataclass
class MQARConfig:
    """vocab_size: model vocabulary; seq_len: input length, at least 4 * num_kv_pairs; num_kv_pairs: pairs per
    example; power_a: query gap power law exponent (small = queries close to the pairs); random_non_queries:
    random filler tokens (else 0)."""
    vocab_size: int = 64
    seq_len: int = 64
    num_kv_pairs: int = 8
    power_a: float = 0.01
    random_non_queries: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self):
        if self.num_kv_pairs < 1:
            raise ValueError(f"num_kv_pairs={self.num_kv_pairs} must be >= 1")
        if not self.power_a > 0:
            raise ValueError(f"power_a={self.power_a} must be > 0")
        if self.vocab_size // 2 - 1 < self.num_kv_pairs:
            raise ValueError(f"vocab_size={self.vocab_size} is too small for num_kv_pairs={self.num_kv_pairs}: "
                             f"need vocab_size >= 2 * (num_kv_pairs + 1) = {2 * (self.num_kv_pairs + 1)} "
                             f"(distinct keys in [1, vocab_size // 2))")
        if self.seq_len < 4 * self.num_kv_pairs:
            raise ValueError(f"seq_len={self.seq_len} is too short for num_kv_pairs={self.num_kv_pairs}: "
                             f"need seq_len >= 4 * num_kv_pairs = {4 * self.num_kv_pairs}")


def generate_mqar(config: MQARConfig, seed: int, num_examples: int) -> dict:
    """Returns input_ids, labels [num_examples, seq_len] and num_kv_pairs [num_examples] (int64 numpy).

    Example (vocab_size=16: keys 1..7, values 8..15; seq_len=12, num_kv_pairs=2; -100 shown as .):
        input_ids  3 12 6 9 | 6 14 2 11 3 0 5 7      (pairs 3->12, 6->9; queries of 6 at gap 0 and 3 at gap 2)
        labels     .  . . . | 9  . . .  12 . . .
    """
    rng = np.random.default_rng(seed)
    num_pairs = config.num_kv_pairs
    context_len = 2 * num_pairs
    num_gaps = (config.seq_len - context_len) // 2
    key_start = 1
    value_start = config.vocab_size // 2
    keys = key_start + choose_without_replacement(rng, num_examples, value_start - key_start, num_pairs)
    values = value_start + choose_without_replacement(rng, num_examples, config.vocab_size - value_start, num_pairs)
    gap_weights = config.power_a * np.arange(1, num_gaps + 1, dtype=np.float64) ** (config.power_a - 1)
    gaps = choose_without_replacement(rng, num_examples, num_gaps, num_pairs, weights=gap_weights)

    shape = (num_examples, config.seq_len)
    input_ids = (rng.integers(0, config.vocab_size, size=shape) if config.random_non_queries
                 else np.zeros(shape, dtype=np.int64))
    input_ids[:, 0:context_len:2] = keys
    input_ids[:, 1:context_len:2] = values
    query_positions = context_len + 2 * gaps
    np.put_along_axis(input_ids, query_positions, keys, axis=1)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(labels, query_positions, values, axis=1)
    return {"input_ids": input_ids, "labels": labels,
            "num_kv_pairs": np.full(num_examples, num_pairs, dtype=np.int64)}
