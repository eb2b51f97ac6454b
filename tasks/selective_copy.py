"""Selective copy: data tokens scattered among noise tokens, to be emitted in order after a separator.

Vocabulary: 0 = SEP, noise tokens are uniform over [1, 1 + num_noise_tokens), data tokens uniform over
[1 + num_noise_tokens, vocab_size). The context holds seq_len - num_tokens positions; the answer fills the rest.
"""
from dataclasses import dataclass

import numpy as np

from .common import answer_after_separator, check_minimum, choose_without_replacement

SEP = 0


@dataclass
class SelectiveCopyConfig:
    """vocab_size: model vocabulary; seq_len: input length = context (seq_len - num_tokens) + answer (num_tokens),
    so at least 2 * num_tokens; num_tokens: data tokens to remember; num_noise_tokens: distinct noise ids."""
    vocab_size: int = 16
    seq_len: int = 32
    num_tokens: int = 8
    num_noise_tokens: int = 1

    def __post_init__(self):
        self.validate()

    def validate(self):
        check_minimum("num_tokens", self.num_tokens, 1)
        check_minimum("num_noise_tokens", self.num_noise_tokens, 1)
        check_minimum("vocab_size", self.vocab_size, self.num_noise_tokens + 2,
                      f"SEP + num_noise_tokens + one data token (num_noise_tokens={self.num_noise_tokens})")
        check_minimum("seq_len", self.seq_len, 2 * self.num_tokens, f"2 * num_tokens (num_tokens={self.num_tokens})")


def generate_selective_copy(config: SelectiveCopyConfig, seed: int, num_examples: int) -> dict:
    """Returns input_ids, labels [num_examples, seq_len] and num_tokens [num_examples] (int64 numpy).

    With vocab_size=8, num_noise_tokens=1 (noise 1, data 2..7), seq_len=10, num_tokens=3:
    >>> config = SelectiveCopyConfig(vocab_size=8, seq_len=10, num_tokens=3, num_noise_tokens=1)
    >>> batch = generate_selective_copy(config, seed=3, num_examples=1)
    >>> print(*batch["input_ids"][0])  # context of 7 holding 3 2 6, SEP, answer[:-1]
    3 1 1 1 2 6 1 0 3 2
    >>> print(*batch["labels"][0])
    -100 -100 -100 -100 -100 -100 -100 3 2 6
    """
    rng = np.random.default_rng(seed)
    context_len = config.seq_len - config.num_tokens
    data_start = 1 + config.num_noise_tokens
    context = rng.integers(1, data_start, size=(num_examples, context_len))
    # sorted positions, so the data tokens appear in the context in the order they must be emitted
    positions = np.sort(choose_without_replacement(rng, num_examples, context_len, config.num_tokens), axis=1)
    tokens = rng.integers(data_start, config.vocab_size, size=(num_examples, config.num_tokens))
    np.put_along_axis(context, positions, tokens, axis=1)
    # context_len + num_tokens = seq_len: nothing is left over for padding
    input_ids, labels = answer_after_separator(context, tokens, SEP, config.seq_len, pad=SEP)
    return {"input_ids": input_ids, "labels": labels,
            "num_tokens": np.full(num_examples, config.num_tokens, dtype=np.int64)}
