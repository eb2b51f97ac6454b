"""Building blocks shared by the task generators: draws without replacement and the answer-after-separator layout.

Every generator follows one convention: `labels[:, t]` is the token the model must predict from `input_ids[:, :t + 1]`
(labels are already shifted), and `labels` is IGNORE_INDEX on every unscored position.
"""
import numpy as np

IGNORE_INDEX = -100  # label of an unscored position (torch's cross_entropy default ignore_index)
SPARSE_RATIO = 4  # population / size from which drawing with replacement and redrawing repeats beats a full sort


def check_minimum(name: str, value: int, minimum: int, rule: str = "") -> None:
    """Raises a one-line ValueError naming the parameter, its value and the bound when value < minimum, e.g.
    `seq_len=10 is too small: need seq_len >= 12 = 2 * copy_len (copy_len=6)`."""
    if value < minimum:
        raise ValueError(f"{name}={value} is too small: need {name} >= {minimum}" + (f" = {rule}" if rule else ""))


def choose_without_replacement(rng: np.random.Generator, num_examples: int, population: int, size: int,
                               weights: np.ndarray | None = None) -> np.ndarray:
    """Draws `size` distinct integers from range(population) for each example, in draw order: [num_examples, size].

    Without `weights` every ordered draw is equally likely. With `weights` ([population], positive) the draw follows
    numpy's `choice(replace=False, p=weights)`: each pick is proportional to the weights of what is left.
    """
    if weights is None and population >= SPARSE_RATIO * size:
        return _choose_uniform_sparse(rng, num_examples, population, size)
    # exponential race (the Gumbel top-k trick with -log(E) as the Gumbel noise): the `size` smallest E / weight, in
    # increasing order; it sorts the whole population per example, so only for small populations
    scores = rng.standard_exponential(size=(num_examples, population))
    if weights is not None:
        scores /= weights
    return np.argsort(scores, axis=1)[:, :size]  # a full (SIMD) sort beats argpartition + argsort at these sizes


def _choose_uniform_sparse(rng: np.random.Generator, num_examples: int, population: int, size: int) -> np.ndarray:
    """choose_without_replacement without weights, at a cost that grows with size, not population: [num_examples, size].

    Draws with replacement, then redraws every entry equal to an entry before it in its row, until no row repeats.
    This is exactly the sequential draw "redraw entry j until it differs from entries 0..j-1" (so each ordered draw
    is equally likely): a value rejected at entry j stays held by some entry before j, because the first entry
    holding a value is never redrawn.
    """
    draws = rng.integers(0, population, size=(num_examples, size))
    rows = np.arange(num_examples)  # rows that may still repeat a value
    while rows.size:
        # sorting value * size + entry keeps equal values in entry order; a plain sort of int64 is SIMD, argsort is not
        ordered, order = np.divmod(np.sort(draws[rows] * size + np.arange(size), axis=1), size)
        repeat_row, repeat_rank = np.nonzero(ordered[:, 1:] == ordered[:, :-1])
        repeat_rows, repeat_entries = rows[repeat_row], order[repeat_row, repeat_rank + 1]
        draws[repeat_rows, repeat_entries] = rng.integers(0, population, size=repeat_rows.size)
        rows = np.unique(repeat_rows)
    return draws


def answer_after_separator(prompt: np.ndarray, answer: np.ndarray, separator: int, seq_len: int,
                           pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Lays out `prompt, separator, answer[:-1]` (teacher forcing) and scores `answer` on the positions before it.

    prompt [N, P], answer [N, A] with P + A <= seq_len -> input_ids, labels [N, seq_len]. Position P (the separator)
    predicts answer[0], position P + i predicts answer[i]. Positions from P + A on hold `pad` and are unscored.
    """
    num_examples, prompt_len = prompt.shape
    answer_len = answer.shape[1]
    input_ids = np.full((num_examples, seq_len), pad, dtype=np.int64)
    input_ids[:, :prompt_len] = prompt
    input_ids[:, prompt_len] = separator
    input_ids[:, prompt_len + 1:prompt_len + answer_len] = answer[:, :-1]
    labels = np.full((num_examples, seq_len), IGNORE_INDEX, dtype=np.int64)
    labels[:, prompt_len:prompt_len + answer_len] = answer
    return input_ids, labels


def check_length_range(min_len: int, seq_len: int, shortest: int = 1) -> None:
    """The checks of a variable-length task: shortest <= min_len <= seq_len, each as one line naming the key."""
    check_minimum("min_len", min_len, shortest)
    check_minimum("seq_len", seq_len, min_len, f"min_len (min_len={min_len})")


def answer_at_end(input_ids: np.ndarray, lengths: np.ndarray, answers: np.ndarray,
                  pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads each example after its own length and scores its answer at its last token.

    input_ids [N, seq_len] (tokens past each length are overwritten), lengths [N] in [1, seq_len], answers [N] ->
    input_ids, labels [N, seq_len]: labels[i, lengths[i] - 1] = answers[i], IGNORE_INDEX elsewhere. A causal model
    never sees the padding before it answers, so one fixed-shape split holds every length.
    """
    num_examples, seq_len = input_ids.shape
    input_ids = np.where(np.arange(seq_len) < lengths[:, None], input_ids, pad)
    labels = np.full((num_examples, seq_len), IGNORE_INDEX, dtype=np.int64)
    labels[np.arange(num_examples), lengths - 1] = answers
    return input_ids, labels
