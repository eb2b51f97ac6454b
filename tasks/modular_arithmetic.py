"""Modular arithmetic: an expression over the integers mod `modulus`, then `=`; predict its value after the `=`.

Grazzi et al. (ICLR 2025) test state tracking on two forms, from the xLSTM paper's code: without brackets,
`a op b op c ... =` with op in + - * and the usual precedence (* before + and -); with brackets (brackets=True),
a random nested expression such as `( ( - 3 ) + ( 4 ) ) =`, built to an exact length by the paper's grammar:
1 token `t`, 2 `- t`, 3 `( t )`, 4 `( - t )`, longer `( left op right )` with the left part's length uniform.
Numbers and operators are uniform. Only the value is scored, at the `=` (no end marker before it; PAD after it).

Vocabulary (both forms): 0 = PAD, 1 = +, 2 = -, 3 = *, 4 = =, 5 = (, 6 = ), then the numbers 0 .. modulus - 1 as
7 .. 6 + modulus. An example's length counts its expression and the `=` (the paper's also counts the answer:
their 3-40 is our 2-39); lengths are uniform in [min_len, seq_len] (without brackets the even ones: an expression
has an odd number of tokens). A test at a longer length L (task.test_lengths, tasks.at_length) draws from
[seq_len, L], as the paper tests on 40-256 after training on 3-40.
"""
from dataclasses import dataclass

import numpy as np

from .common import answer_at_end, check_length_range, check_minimum

PAD, PLUS, MINUS, TIMES, EQUALS, OPEN, CLOSE = range(7)
NUMBER = 7  # token of number x: NUMBER + x


@dataclass
class ModularArithmeticConfig:
    """vocab_size: model vocabulary, at least 7 + modulus; seq_len: the longest example (input width); min_len: the
    shortest (expression and `=`); modulus: the numbers and the answer are taken mod it; brackets: nested
    expressions with brackets and unary minus (else a flat expression)."""
    vocab_size: int = 12
    seq_len: int = 40
    min_len: int = 3
    modulus: int = 5
    brackets: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self):
        check_minimum("modulus", self.modulus, 2)
        check_minimum("vocab_size", self.vocab_size, NUMBER + self.modulus,
                      f"7 + modulus (PAD, + - * = ( ) and modulus={self.modulus} numbers)")
        check_length_range(self.min_len, self.seq_len, shortest=2)
        if not self.brackets:
            check_minimum("seq_len", self.seq_len, self.min_len + self.min_len % 2,
                          f"min_len rounded up to even (min_len={self.min_len}; without brackets a length is even)")


def generate_modular_arithmetic(config: ModularArithmeticConfig, seed: int, num_examples: int) -> dict:
    """Returns input_ids, labels [num_examples, seq_len] (int64 numpy).

    >>> batch = generate_modular_arithmetic(ModularArithmeticConfig(seq_len=10), seed=1, num_examples=2)
    >>> print(*batch["input_ids"][0])  # 3 + 4 * 0 = : 3 + 0 = 3
    10 1 11 3 7 4 0 0 0 0
    >>> print(*batch["labels"][0])  # the number 3 at the `=`
    -100 -100 -100 -100 -100 10 -100 -100 -100 -100
    >>> print(*batch["input_ids"][1])  # 4 - 1 + 1 + 4 = : 8 = 3 mod 5
    11 2 8 1 8 1 11 4 0 0
    >>> print(*batch["labels"][1])
    -100 -100 -100 -100 -100 -100 -100 10 -100 -100
    >>> config = ModularArithmeticConfig(seq_len=12, min_len=10, brackets=True)
    >>> batch = generate_modular_arithmetic(config, seed=1, num_examples=1)
    >>> print(*batch["input_ids"][0])  # ( ( - 3 ) + ( 4 ) ) = : 1
    5 5 2 10 6 1 5 11 6 6 4 0
    >>> print(*batch["labels"][0])
    -100 -100 -100 -100 -100 -100 -100 -100 -100 -100 8 -100
    """
    rng = np.random.default_rng(seed)
    generate = _bracketed if config.brackets else _flat
    input_ids, lengths, answers = generate(rng, config, num_examples)
    input_ids[np.arange(num_examples), lengths - 1] = EQUALS
    input_ids, labels = answer_at_end(input_ids, lengths, NUMBER + answers, PAD)
    return {"input_ids": input_ids, "labels": labels}


def _flat(rng: np.random.Generator, config: ModularArithmeticConfig, num_examples: int):
    """Expressions `x0 op x1 op ... x(k-1)` at the even positions (numbers) and odd ones (operators):
    input_ids [N, seq_len] (position length - 1, for the `=`, is overwritten by the caller), lengths [N], answers
    [N]."""
    m, seq_len = config.modulus, config.seq_len
    lengths = 2 * rng.integers((config.min_len + 1) // 2, seq_len // 2 + 1, size=num_examples)
    numbers = rng.integers(0, m, size=(num_examples, (seq_len + 1) // 2))
    ops = rng.integers(PLUS, TIMES + 1, size=(num_examples, seq_len // 2))
    input_ids = np.empty((num_examples, seq_len), dtype=np.int64)
    input_ids[:, 0::2], input_ids[:, 1::2] = NUMBER + numbers, ops
    # left to right with precedence: `term` is the running product, added to `total` (with its sign) at + or -
    total, term, sign = np.zeros(num_examples, dtype=np.int64), numbers[:, 0], np.ones(num_examples, dtype=np.int64)
    for j in range(1, seq_len // 2):
        active, op, x = j < lengths // 2, ops[:, j - 1], numbers[:, j]
        adds = active & (op != TIMES)
        total = np.where(adds, (total + sign * term) % m, total)
        term = np.where(adds, x, np.where(active, term * x % m, term))
        sign = np.where(adds, np.where(op == PLUS, 1, -1), sign)
    return input_ids, lengths, (total + sign * term) % m


def _bracketed(rng: np.random.Generator, config: ModularArithmeticConfig, num_examples: int):
    """Nested expressions of exactly length - 1 tokens each (the paper's grammar): input_ids [N, seq_len] (the
    caller writes the `=` and the padding), lengths [N], answers [N]."""
    m = config.modulus
    lengths = rng.integers(config.min_len, config.seq_len + 1, size=num_examples)
    input_ids = np.full((num_examples, config.seq_len), PAD, dtype=np.int64)
    answers = np.empty(num_examples, dtype=np.int64)
    for row, length in enumerate(lengths.tolist()):
        tokens, answers[row] = _expression(rng, length - 1, m)
        input_ids[row, :len(tokens)] = tokens
    return input_ids, lengths, answers


def _expression(rng: np.random.Generator, length: int, m: int) -> tuple[list, int]:
    """(tokens, value mod m) of a random bracketed expression of exactly `length` >= 1 tokens."""
    if length < 5:
        x = int(rng.integers(m))
        return {1: ([NUMBER + x], x), 2: ([MINUS, NUMBER + x], -x % m), 3: ([OPEN, NUMBER + x, CLOSE], x),
                4: ([OPEN, MINUS, NUMBER + x, CLOSE], -x % m)}[length]
    left_len = int(rng.integers(1, length - 3))  # in [1, length - 4]; the right part gets the rest
    left, a = _expression(rng, left_len, m)
    right, b = _expression(rng, length - 3 - left_len, m)
    op = PLUS + int(rng.integers(3))
    value = {PLUS: a + b, MINUS: a - b, TIMES: a * b}[op] % m
    return [OPEN, *left, op, *right, CLOSE], value
