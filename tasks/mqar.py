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

from .common import IGNORE_INDEX, check_minimum, choose_without_replacement


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
        check_minimum("num_kv_pairs", self.num_kv_pairs, 1)
        if not self.power_a > 0:
            raise ValueError(f"power_a={self.power_a} must be > 0")
        check_minimum("vocab_size", self.vocab_size, 2 * (self.num_kv_pairs + 1),
                      f"2 * (num_kv_pairs + 1) (num_kv_pairs={self.num_kv_pairs} distinct keys below vocab_size // 2)")
        check_minimum("seq_len", self.seq_len, 4 * self.num_kv_pairs,
                      f"4 * num_kv_pairs (num_kv_pairs={self.num_kv_pairs})")


def generate_mqar(config: MQARConfig, seed: int, num_examples: int) -> dict:
    """Returns input_ids, labels [num_examples, seq_len] and num_kv_pairs [num_examples] (int64 numpy).

    With vocab_size=16 (keys 1..7, values 8..15), seq_len=14, num_kv_pairs=2:
    >>> batch = generate_mqar(MQARConfig(vocab_size=16, seq_len=14, num_kv_pairs=2), seed=3, num_examples=1)
    >>> print(*batch["input_ids"][0])  # pairs 1->10, 6->9; key 6 queried at gap 0, key 1 at gap 1
    1 10 6 9 6 15 1 4 5 10 10 11 13 4
    >>> print(*batch["labels"][0])
    -100 -100 -100 -100 9 -100 10 -100 -100 -100 -100 -100 -100 -100
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
