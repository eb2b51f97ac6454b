"""Building blocks shared by the task generators: draws without replacement and the answer-after-separator layout.

Every generator follows one convention: `labels[:, t]` is the token the model must predict from `input_ids[:, :t + 1]`
(labels are already shifted), and `labels` is IGNORE_INDEX on every unscored position.
"""
import numpy as np

IGNORE_INDEX = -100  # label of an unscored position (torch's cross_entropy default ignore_index)


def check_minimum(name: str, value: int, minimum: int, rule: str = "") -> None:
    """Raises a one-line ValueError naming the parameter, its value and the bound when value < minimum, e.g.
    `seq_len=10 is too small: need seq_len >= 12 = 2 * copy_len (copy_len=6)`."""
    if value < minimum:
        raise ValueError(f"{name}={value} is too small: need {name} >= {minimum}" + (f" = {rule}" if rule else ""))


def choose_without_replacement(rng: np.random.Generator, num_examples: int, population: int, size: int,
                               weights: np.ndarray | None = None) -> np.ndarray:
    """Draws `size` distinct integers from range(population) for each example, in draw order: [num_examples, size].

    With `weights` ([population], positive) the draw follows numpy's `choice(replace=False, p=weights)`: each pick is
    proportional to the weights of what is left. Vectorised across examples with the Gumbel top-k trick: the `size`
    largest log(weight) + Gumbel noise, in decreasing order.
    """
    scores = rng.gumbel(size=(num_examples, population))
    if weights is not None:
        scores += np.log(weights)
    top = np.argpartition(-scores, size - 1, axis=1)[:, :size]  # O(population), unlike a full sort
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


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
