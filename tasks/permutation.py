"""Permutation composition, the word problem of the symmetric group S_degree (S3: degree=3, S5: degree=5): a
sequence of permutations; at every position, predict their composition so far.

The state-tracking task of Merrill et al. (ICML 2024, "The Illusion of State in State-Space Models"), which
Grazzi et al. (ICLR 2025) use for S5: token i is the i-th permutation of range(degree) in lexicographic order
(0 = the identity), and the label at position t is the token of the permutation that applying the tokens
0..t in turn amounts to (first token 0, then token 1, ...). S5 is not solvable, so no constant-depth shortcut
exists: a model must track the state. Every prefix is scored, so a length-T example trains every length up to T;
min_len leaves the prefixes shorter than it unscored, so a test at a longer length L (task.test_lengths,
tasks.at_length: min_len = the training seq_len) scores only the prefixes of length seq_len .. L.
"""
import itertools
import math
from dataclasses import dataclass

import numpy as np

from .common import IGNORE_INDEX, check_length_range, check_minimum


@dataclass
class PermutationConfig:
    """vocab_size: model vocabulary, at least degree!; seq_len: input length; min_len: the shortest scored prefix;
    degree: the group is S_degree (3: S3, 6 elements; 5: S5, 120 elements)."""
    vocab_size: int = 120
    seq_len: int = 64
    min_len: int = 1
    degree: int = 5

    def __post_init__(self):
        self.validate()

    def validate(self):
        check_minimum("degree", self.degree, 2)
        check_minimum("vocab_size", self.vocab_size, math.factorial(self.degree),
                      f"degree! (the elements of S{self.degree})")
        check_length_range(self.min_len, self.seq_len)


def composition_table(degree: int) -> np.ndarray:
    """[n!, n!]: entry [a, s] is the token of permutation s followed by permutation a, i.e. x -> a[s[x]]."""
    perms = np.array(list(itertools.permutations(range(degree))))
    index = {tuple(p): i for i, p in enumerate(perms.tolist())}
    return np.array([[index[tuple(a[s])] for s in perms] for a in perms], dtype=np.int64)


def generate_permutation(config: PermutationConfig, seed: int, num_examples: int) -> dict:
    """Returns input_ids, labels [num_examples, seq_len] (int64 numpy).

    S3's tokens: 0 = (0 1 2), 1 = (0 2 1), 2 = (1 0 2), 3 = (1 2 0), 4 = (2 0 1), 5 = (2 1 0), each the images of 0 1 2.
    >>> batch = generate_permutation(PermutationConfig(seq_len=6, min_len=2, degree=3), seed=0, num_examples=1)
    >>> print(*batch["input_ids"][0])
    5 3 3 1 1 0
    >>> print(*batch["labels"][0])  # 3 after 5 is x -> 3[5[x]] = (1 2 0)[(2 1 0)] = (0 2 1) = 1; the first unscored
    -100 1 2 4 2 2
    """
    rng = np.random.default_rng(seed)
    table = composition_table(config.degree)
    input_ids = rng.integers(0, len(table), size=(num_examples, config.seq_len))
    labels = np.empty_like(input_ids)
    state = np.zeros(num_examples, dtype=np.int64)  # the identity
    for t in range(config.seq_len):
        state = labels[:, t] = table[input_ids[:, t], state]
    labels[:, :config.min_len - 1] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels}
