"""Needle in a haystack (passkey / S-NIAH style): key->value needles hidden in random filler, queried at the end.

Vocabulary: 0 = QUERY; with n = (vocab_size - 1) // 3, keys are [1, 1 + n), values [1 + n, 1 + 2n), filler
[1 + 2n, vocab_size), so a filler token is never a key. The haystack holds seq_len - 2 * num_queries positions of
uniform filler with num_needles needles `key value` (distinct keys, values drawn with replacement) at uniform,
non-overlapping positions. It is followed by `QUERY k v k v ... k` asking num_queries of the needles' keys (a
random subset, so the other needles are distractors); the label at each queried key is its needle's value.
num_needles=num_queries=1 is the single-needle passkey task.
"""
from dataclasses import dataclass

import numpy as np

from .common import IGNORE_INDEX, check_minimum, choose_without_replacement

QUERY = 0


@dataclass
class NeedleConfig:
    """vocab_size: model vocabulary (>= 3 * num_needles + 1); seq_len: haystack + query, at least
    2 * (num_needles + num_queries); num_needles: key-value needles in the haystack; num_queries: how many of them
    are asked at the end."""
    vocab_size: int = 64
    seq_len: int = 64
    num_needles: int = 1
    num_queries: int = 1

    def __post_init__(self):
        self.validate()

    def validate(self):
        check_minimum("num_needles", self.num_needles, 1)
        if not 1 <= self.num_queries <= self.num_needles:
            raise ValueError(f"num_queries={self.num_queries} must be in [1, num_needles={self.num_needles}]")
        check_minimum("vocab_size", self.vocab_size, 3 * self.num_needles + 1,
                      f"3 * num_needles + 1 (num_needles={self.num_needles})")
        check_minimum("seq_len", self.seq_len, 2 * (self.num_needles + self.num_queries),
                      f"2 * (num_needles + num_queries) (num_needles={self.num_needles}, "
                      f"num_queries={self.num_queries})")


def generate_needle(config: NeedleConfig, seed: int, num_examples: int) -> dict:
    """Returns input_ids, labels [num_examples, seq_len], num_needles and needle_depth [num_examples] (int64
    numpy); needle_depth is the first queried needle's start as a percentage of the haystack (0 = start, 100 = end).

    With vocab_size=10 (keys 1..3, values 4..6, filler 7..9), seq_len=14, num_needles=2, num_queries=1:
    >>> config = NeedleConfig(vocab_size=10, seq_len=14, num_needles=2, num_queries=1)
    >>> batch = generate_needle(config, seed=1, num_examples=1)
    >>> print(*batch["input_ids"][0])  # needles 3->6 at 5 and 1->6 at 9 in a haystack of 12, QUERY, key 3
    8 8 9 9 7 3 6 9 7 1 6 8 0 3
    >>> print(*batch["labels"][0])
    -100 -100 -100 -100 -100 -100 -100 -100 -100 -100 -100 -100 -100 6
    >>> print(*batch["needle_depth"])  # start 5 of the last possible start 10
    50
    """
    rng = np.random.default_rng(seed)
    n = (config.vocab_size - 1) // 3
    key_start, value_start, filler_start = 1, 1 + n, 1 + 2 * n
    num_needles, num_queries = config.num_needles, config.num_queries
    haystack_len = config.seq_len - 2 * num_queries

    input_ids = rng.integers(filler_start, config.vocab_size, size=(num_examples, config.seq_len))
    keys = key_start + choose_without_replacement(rng, num_examples, n, num_needles)
    values = rng.integers(value_start, filler_start, size=(num_examples, num_needles))
    # sorted draws from haystack_len - num_needles starts, shifted by their rank, never overlap and are uniform
    starts = np.sort(choose_without_replacement(rng, num_examples, haystack_len - num_needles, num_needles), axis=1)
    starts += np.arange(num_needles)
    np.put_along_axis(input_ids, starts, keys, axis=1)
    np.put_along_axis(input_ids, starts + 1, values, axis=1)

    asked = choose_without_replacement(rng, num_examples, num_needles, num_queries)  # needle indices
    asked_keys = np.take_along_axis(keys, asked, axis=1)
    asked_values = np.take_along_axis(values, asked, axis=1)
    input_ids[:, haystack_len] = QUERY
    input_ids[:, haystack_len + 1::2] = asked_keys
    input_ids[:, haystack_len + 2::2] = asked_values[:, :-1]
    labels = np.full((num_examples, config.seq_len), IGNORE_INDEX, dtype=np.int64)
    labels[:, haystack_len + 1::2] = asked_values

    first_start = np.take_along_axis(starts, asked[:, :1], axis=1)[:, 0]
    needle_depth = np.rint(100 * first_start / max(haystack_len - 2, 1)).astype(np.int64)
    return {"input_ids": input_ids, "labels": labels,
            "num_needles": np.full(num_examples, num_needles, dtype=np.int64), "needle_depth": needle_depth}
