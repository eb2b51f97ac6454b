"""Synthetic tasks: determinism, layout, answers on exactly the scored positions, size errors and the split cache."""
import dataclasses
import doctest
import itertools
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import tasks
import tasks.common
from tasks.common import IGNORE_INDEX, choose_without_replacement

NUM_EXAMPLES = 64


def scored(batch):
    """Boolean mask [N, seq_len] of the positions with a label."""
    return batch["labels"] != IGNORE_INDEX


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_shapes_dtypes_and_token_ranges(name):
    config = tasks.make_config(name)
    batch = tasks.make_task(name, seed=0, num_examples=NUM_EXAMPLES)
    assert {"input_ids", "labels"} <= batch.keys()
    for column, tensor in batch.items():
        assert tensor.dtype == torch.long, column
        expected = (NUM_EXAMPLES, config.seq_len) if column in ("input_ids", "labels") else (NUM_EXAMPLES,)
        assert tensor.shape == expected, column
    assert 0 <= batch["input_ids"].min() and batch["input_ids"].max() < config.vocab_size
    labels = batch["labels"][scored(batch)]
    assert scored(batch).any(dim=1).all()
    assert 0 <= labels.min() and labels.max() < config.vocab_size


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_same_seed_same_data_and_different_seeds_differ(name):
    first = tasks.make_task(name, seed=3, num_examples=NUM_EXAMPLES)
    again = tasks.make_task(name, seed=3, num_examples=NUM_EXAMPLES)
    other = tasks.make_task(name, seed=4, num_examples=NUM_EXAMPLES)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[column], again[column]) for column in first)
    assert not torch.equal(first["input_ids"], other["input_ids"])


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_config_class_has_vocab_and_seq_len_and_valid_defaults(name):
    cls = tasks.config_class(name)
    assert dataclasses.is_dataclass(cls)
    assert {"vocab_size", "seq_len"} <= {field.name for field in dataclasses.fields(cls)}
    cls().validate()


def test_train_and_test_seeds_are_disjoint():
    train = {tasks.task_seed(seed, "train") for seed in range(1000)}
    test = {tasks.task_seed(seed, "test") for seed in range(1000)}
    assert len(train) == len(test) == 1000 and not train & test
    assert tasks.task_seed(tasks.SEEDS_PER_SPLIT - 1, "train") < tasks.task_seed(0, "test")
    with pytest.raises(ValueError, match="split='val'"):
        tasks.task_seed(0, "val")
    with pytest.raises(ValueError, match=f"seed={tasks.SEEDS_PER_SPLIT}"):
        tasks.task_seed(tasks.SEEDS_PER_SPLIT, "train")


@pytest.mark.parametrize("name", ["copy", "reverse"])
def test_copy_and_reverse_answer_the_string(name):
    copy_len, seq_len = 5, 13  # 3 positions of padding after the answer
    batch = tasks.make_task(name, seed=1, num_examples=NUM_EXAMPLES, vocab_size=10, seq_len=seq_len,
                            copy_len=copy_len)
    input_ids, labels = batch["input_ids"], batch["labels"]
    string = input_ids[:, :copy_len]
    answer = string.flip(1) if name == "reverse" else string
    assert (string >= 2).all()
    assert (input_ids[:, copy_len] == 1).all()  # SEP
    assert torch.equal(input_ids[:, copy_len + 1:2 * copy_len], answer[:, :-1])  # teacher forcing
    assert (input_ids[:, 2 * copy_len:] == 0).all()  # PAD
    assert torch.equal(labels[:, copy_len:2 * copy_len], answer)
    assert (labels[:, :copy_len] == IGNORE_INDEX).all() and (labels[:, 2 * copy_len:] == IGNORE_INDEX).all()


def test_reverse_reverses_the_string_copy_would_copy():
    params = dict(seed=2, num_examples=NUM_EXAMPLES, vocab_size=12, seq_len=12, copy_len=6)
    copied, reversed_ = tasks.make_task("copy", **params), tasks.make_task("reverse", **params)
    assert torch.equal(copied["input_ids"][:, :6], reversed_["input_ids"][:, :6])
    assert torch.equal(reversed_["labels"][:, 6:], copied["labels"][:, 6:].flip(1))


def test_selective_copy_answers_the_data_tokens_in_order():
    num_tokens, num_noise_tokens, seq_len = 6, 3, 30
    batch = tasks.make_task("selective_copy", seed=5, num_examples=NUM_EXAMPLES, vocab_size=12, seq_len=seq_len,
                            num_tokens=num_tokens, num_noise_tokens=num_noise_tokens)
    context_len = seq_len - num_tokens
    context = batch["input_ids"][:, :context_len]
    is_data = context >= 1 + num_noise_tokens
    assert (is_data.sum(dim=1) == num_tokens).all()
    assert (context >= 1).all()  # noise or data, never SEP
    data_in_order = context[is_data].view(NUM_EXAMPLES, num_tokens)  # boolean indexing keeps row-major order
    assert torch.equal(batch["labels"][:, context_len:], data_in_order)
    assert (batch["labels"][:, :context_len] == IGNORE_INDEX).all()
    assert (batch["input_ids"][:, context_len] == 0).all()
    assert torch.equal(batch["input_ids"][:, context_len + 1:], data_in_order[:, :-1])


def test_mqar_labels_are_the_values_of_the_queried_keys():
    vocab_size, seq_len, num_pairs = 40, 48, 6
    batch = tasks.make_task("mqar", seed=7, num_examples=NUM_EXAMPLES, vocab_size=vocab_size, seq_len=seq_len,
                            num_kv_pairs=num_pairs)
    input_ids, labels = batch["input_ids"], batch["labels"]
    keys, values = input_ids[:, 0:2 * num_pairs:2], input_ids[:, 1:2 * num_pairs:2]
    assert ((1 <= keys) & (keys < vocab_size // 2)).all()
    assert ((vocab_size // 2 <= values) & (values < vocab_size)).all()
    for row in range(NUM_EXAMPLES):
        assert len(set(keys[row].tolist())) == len(set(values[row].tolist())) == num_pairs
        value_of = dict(zip(keys[row].tolist(), values[row].tolist()))
        positions = scored(batch)[row].nonzero().flatten()
        assert (positions >= 2 * num_pairs).all() and ((positions - 2 * num_pairs) % 2 == 0).all()
        queried = input_ids[row, positions].tolist()
        assert sorted(queried) == sorted(value_of)  # every key queried exactly once
        assert labels[row, positions].tolist() == [value_of[key] for key in queried]
    assert torch.equal(batch["num_kv_pairs"], torch.full((NUM_EXAMPLES,), num_pairs))


def test_mqar_queries_follow_the_power_law():
    """power_a=0.01 puts most queries right after the pairs; a large power_a = 1 spreads them uniformly."""
    def mean_query_offset(power_a):
        batch = tasks.make_task("mqar", seed=0, num_examples=2000, vocab_size=16, seq_len=66, num_kv_pairs=1,
                                power_a=power_a)
        return (scored(batch).long().argmax(dim=1) - 2).float().mean().item() / 2  # gap in [0, 32)

    assert mean_query_offset(0.01) < 10 < 14 < mean_query_offset(1.0) < 18  # uniform mean gap: 15.5


def test_mqar_zero_filler_without_random_non_queries():
    batch = tasks.make_task("mqar", seed=0, num_examples=8, num_kv_pairs=4, seq_len=32, random_non_queries=False)
    query_region = batch["input_ids"][:, 8:]
    assert ((query_region == 0) | scored(batch)[:, 8:]).all()


@pytest.mark.parametrize("num_needles, num_queries", [(1, 1), (4, 1), (5, 3)])
def test_needle_labels_are_the_needle_values(num_needles, num_queries):
    vocab_size, seq_len = 31, 50  # keys 1..10, values 11..20, filler 21..30
    batch = tasks.make_task("needle", seed=11, num_examples=NUM_EXAMPLES, vocab_size=vocab_size, seq_len=seq_len,
                            num_needles=num_needles, num_queries=num_queries)
    input_ids, labels = batch["input_ids"], batch["labels"]
    haystack_len = seq_len - 2 * num_queries
    haystack = input_ids[:, :haystack_len]
    is_key = (1 <= haystack) & (haystack <= 10)
    assert (is_key.sum(dim=1) == num_needles).all()
    assert ((haystack == 0).sum() == 0) and (input_ids[:, haystack_len] == 0).all()  # QUERY only at the end
    positions = torch.arange(haystack_len - 1)
    is_value = (11 <= haystack) & (haystack <= 20)
    assert torch.equal(is_value[:, 1:], is_key[:, :-1])  # a value right after each key, nowhere else
    for row in range(NUM_EXAMPLES):
        key_positions = positions[is_key[row, :-1]]
        value_of = dict(zip(haystack[row, key_positions].tolist(), haystack[row, key_positions + 1].tolist()))
        asked = input_ids[row, haystack_len + 1::2].tolist()
        assert len(asked) == len(set(asked)) == num_queries and set(asked) <= value_of.keys()
        assert labels[row, haystack_len + 1::2].tolist() == [value_of[key] for key in asked]
        assert input_ids[row, haystack_len + 2::2].tolist() == [value_of[key] for key in asked[:-1]]
        first_start = key_positions[haystack[row, key_positions] == asked[0]].item()
        assert batch["needle_depth"][row] == round(100 * first_start / (haystack_len - 2))
    assert scored(batch).sum() == NUM_EXAMPLES * num_queries
    assert 0 <= batch["needle_depth"].min() and batch["needle_depth"].max() <= 100


def lengths_and_answers(batch):
    """Each example's length (its scored position + 1) and answer, for the tasks scored once at their end."""
    assert (scored(batch).sum(dim=1) == 1).all()
    position = scored(batch).long().argmax(dim=1)
    return position + 1, batch["labels"].gather(1, position[:, None]).squeeze(1)


def test_parity_answers_the_parity_of_the_bits_after_the_last_one():
    batch = tasks.make_task("parity", seed=3, num_examples=2000, seq_len=12, min_len=4)
    lengths, answers = lengths_and_answers(batch)
    assert set(lengths.tolist()) == set(range(4, 13))  # every length in [min_len, seq_len]
    for row in range(len(lengths)):
        bits, pad = batch["input_ids"][row, :lengths[row]], batch["input_ids"][row, lengths[row]:]
        assert ((bits == 1) | (bits == 2)).all() and (pad == 0).all()
        assert answers[row] == 1 + (bits == 2).sum() % 2
    assert 0.45 < (answers == 2).float().mean() < 0.55


def expression_value(tokens, modulus):
    """The value mod modulus of a modular_arithmetic expression (token ids up to the `=`), by Python's own
    arithmetic: the same precedence, brackets and unary minus."""
    symbols = {1: "+", 2: "-", 3: "*", 5: "(", 6: ")"}
    return eval("".join(symbols.get(t, str(t - 7)) for t in tokens)) % modulus  # our own digits and symbols only


@pytest.mark.parametrize("brackets", [False, True])
def test_modular_arithmetic_answers_the_value_of_the_expression(brackets):
    modulus = 7
    batch = tasks.make_task("modular_arithmetic", seed=5, num_examples=500, vocab_size=7 + modulus, seq_len=24,
                            min_len=3, modulus=modulus, brackets=brackets)
    lengths, answers = lengths_and_answers(batch)
    expected_lengths = range(3, 25) if brackets else range(4, 25, 2)  # without brackets: expression + `=` is even
    assert set(lengths.tolist()) == set(expected_lengths)
    for row in range(len(lengths)):
        tokens = batch["input_ids"][row].tolist()
        assert tokens[lengths[row] - 1] == 4 and 4 not in tokens[:lengths[row] - 1]  # one `=`, at the end
        assert set(tokens[lengths[row]:]) <= {0}
        assert answers[row] == 7 + expression_value(tokens[:lengths[row] - 1], modulus)
        assert brackets or not {5, 6} & set(tokens)
    assert len(set(answers.tolist())) == modulus


@pytest.mark.parametrize("degree", [3, 5])
def test_permutation_labels_are_the_compositions_so_far(degree):
    perms = list(itertools.permutations(range(degree)))  # token i is perms[i]
    batch = tasks.make_task("permutation", seed=2, num_examples=50, seq_len=20, min_len=5, degree=degree)
    assert batch["input_ids"].max() < len(perms) and len(batch["input_ids"].unique()) == len(perms)
    assert (batch["labels"][:, :4] == IGNORE_INDEX).all()
    for row in range(50):
        state = tuple(range(degree))
        for t, token in enumerate(batch["input_ids"][row].tolist()):
            state = tuple(perms[token][x] for x in state)  # then apply the permutation of this token
            if t >= 4:
                assert batch["labels"][row, t] == perms.index(state)


@pytest.mark.parametrize("name, params", [("parity", dict(seq_len=40, min_len=3)),
                                          ("modular_arithmetic", dict(seq_len=40, min_len=3)),
                                          ("permutation", dict(seq_len=64, min_len=1))])
def test_a_longer_test_length_holds_only_lengths_from_the_training_maximum_on(name, params):
    longer = tasks.at_length(name, 256, **params)
    assert longer["seq_len"] == 256 and longer["min_len"] == params["seq_len"]
    batch = tasks.make_task(name, seed=0, num_examples=2000, **longer)
    first_scored = scored(batch).long().argmax(dim=1)
    assert first_scored.min() == params["seq_len"] - 1 and scored(batch).any(dim=1).all()


@pytest.mark.parametrize("sparse_ratio", [1, 10 ** 9])  # every draw by redrawing repeats, every draw by sorting
def test_choose_without_replacement_makes_every_ordered_draw_equally_likely(monkeypatch, sparse_ratio):
    monkeypatch.setattr(tasks.common, "SPARSE_RATIO", sparse_ratio)
    population, size, num_examples = 5, 3, 60_000  # 60 ordered draws, 1000 of each expected
    draws = choose_without_replacement(np.random.default_rng(0), num_examples, population, size)
    assert draws.shape == (num_examples, size) and draws.min() >= 0 and draws.max() < population
    assert (np.sort(draws, axis=1)[:, 1:] > np.sort(draws, axis=1)[:, :-1]).all()  # distinct within each row
    counts = np.bincount(draws @ population ** np.arange(size), minlength=population ** size)
    counts = counts[counts > 0]
    assert counts.size == 60
    # chi-square with 59 degrees of freedom: mean 59, sd 11; never drawing one value (or one position's value) makes
    # it thousands
    assert ((counts - 1000) ** 2 / 1000).sum() < 120


def test_choose_without_replacement_from_a_large_population_is_distinct_and_reaches_every_value():
    population, size = 4096, 64  # MQAR keys at num_kv_pairs=64: drawn with replacement, repeats redrawn
    draws = choose_without_replacement(np.random.default_rng(1), 5000, population, size)
    assert (np.sort(draws, axis=1)[:, 1:] > np.sort(draws, axis=1)[:, :-1]).all()
    counts = np.bincount(draws.ravel(), minlength=population)  # 78 of each value expected
    assert counts.size == population and counts.min() > 30 and counts.max() < 140
    assert np.abs(draws.mean(axis=0) - (population - 1) / 2).max() < 100  # every position uniform: sd 16


def test_choose_without_replacement_with_weights_follows_numpy_choice():
    weights = np.array([8.0, 4.0, 2.0, 1.0, 1.0])
    rng = np.random.default_rng(0)
    ours = choose_without_replacement(rng, 20000, 5, 2, weights=weights)
    numpy_draws = np.array([rng.choice(5, size=2, replace=False, p=weights / weights.sum()) for _ in range(20000)])
    for pick in range(2):  # the first pick follows the weights, the second the weights of what is left
        frequency, numpy_frequency = (np.bincount(draws[:, pick], minlength=5) / 20000
                                      for draws in (ours, numpy_draws))
        np.testing.assert_allclose(frequency, numpy_frequency, atol=0.02)  # sd of the difference <= 0.005
    np.testing.assert_allclose(np.bincount(ours[:, 0], minlength=5) / 20000, weights / weights.sum(), atol=0.015)
    assert (ours[:, 0] != ours[:, 1]).all()


@pytest.mark.parametrize("name, params, message", [
    ("copy", dict(seq_len=10, copy_len=6),
     r"seq_len=10 is too small: need seq_len >= 12 = 2 \* copy_len \(copy_len=6\)$"),
    ("copy", dict(vocab_size=2), "vocab_size=2 is too small: need vocab_size >= 3"),
    ("copy", dict(copy_len=0), "copy_len=0 is too small: need copy_len >= 1"),
    ("reverse", dict(seq_len=3, copy_len=2), "seq_len=3 is too small: need seq_len >= 4"),
    ("selective_copy", dict(seq_len=15, num_tokens=8), "seq_len=15 is too small: need seq_len >= 16"),
    ("selective_copy", dict(vocab_size=4, num_noise_tokens=3), "vocab_size=4 is too small: need vocab_size >= 5"),
    ("selective_copy", dict(num_noise_tokens=0), "num_noise_tokens=0 is too small"),
    ("mqar", dict(seq_len=31, num_kv_pairs=8), "seq_len=31 is too small: need seq_len >= 32"),
    ("mqar", dict(vocab_size=17, num_kv_pairs=8), "vocab_size=17 is too small: need vocab_size >= 18"),
    ("mqar", dict(power_a=0.0), "power_a=0.0 must be > 0"),
    ("needle", dict(num_needles=2, num_queries=3), r"num_queries=3 must be in \[1, num_needles=2\]"),
    ("needle", dict(vocab_size=9, num_needles=3), "vocab_size=9 is too small: need vocab_size >= 10"),
    ("needle", dict(seq_len=5, num_needles=2), r"seq_len=5 is too small: need seq_len >= 6 .*num_queries=1\)"),
    ("parity", dict(seq_len=10, min_len=12), r"seq_len=10 is too small: need seq_len >= 12 = min_len \(min_len=12\)$"),
    ("parity", dict(min_len=0), "min_len=0 is too small: need min_len >= 1$"),
    ("parity", dict(vocab_size=2), "vocab_size=2 is too small: need vocab_size >= 3"),
    ("modular_arithmetic", dict(modulus=7), r"vocab_size=12 is too small: need vocab_size >= 14 = 7 \+ modulus"),
    ("modular_arithmetic", dict(seq_len=5, min_len=5), r"seq_len=5 is too small: need seq_len >= 6 = min_len rounded"),
    ("modular_arithmetic", dict(min_len=1, brackets=True), "min_len=1 is too small: need min_len >= 2$"),
    ("permutation", dict(degree=5, vocab_size=119), r"vocab_size=119 is too small: need vocab_size >= 120 = degree!"),
    ("permutation", dict(degree=1), "degree=1 is too small: need degree >= 2$"),
])
def test_impossible_sizes_raise_one_clear_line(name, params, message):
    with pytest.raises(ValueError, match=message) as error:
        tasks.make_task(name, seed=0, num_examples=1, **params)
    assert "\n" not in str(error.value)


def test_unknown_task_and_parameter_raise():
    with pytest.raises(ValueError, match="unknown task 'kopy'; known tasks: copy, reverse, mqar"):
        tasks.make_task("kopy", seed=0, num_examples=1)
    with pytest.raises(ValueError, match="unknown parameter 'num_kv_pair' for task 'mqar'"):
        tasks.make_task("mqar", seed=0, num_examples=1, num_kv_pair=4)
    with pytest.raises(ValueError, match="num_examples=-1"):
        tasks.make_task("copy", seed=0, num_examples=-1)


def test_load_split_caches_and_does_not_regenerate(tmp_path, monkeypatch):
    params = dict(split="train", seed=0, num_examples=32, cache_dir=str(tmp_path), num_kv_pairs=4, seq_len=32)
    first = tasks.load_split("mqar", **params)
    expected = tasks.make_task("mqar", seed=tasks.task_seed(0, "train"), num_examples=32, num_kv_pairs=4,
                               seq_len=32)
    assert first.keys() == expected.keys()
    assert all(torch.equal(first[column], expected[column]) for column in expected)
    entry, lock = sorted(os.listdir(tmp_path))  # one entry and its lock file, no temporary directory left behind
    assert entry.startswith("mqar-") and lock == f"{entry}.lock"

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a cached split")
    monkeypatch.setattr(tasks, "make_task", fail)
    again = tasks.load_split("mqar", **params)
    assert all(torch.equal(again[column], first[column]) for column in first)
    # the defaults written out are the same entry; a different split is a new one
    tasks.load_split("mqar", **params, vocab_size=tasks.MQARConfig.vocab_size)
    monkeypatch.undo()
    test = tasks.load_split("mqar", **{**params, "split": "test"})
    assert not torch.equal(test["input_ids"], first["input_ids"])
    assert len(os.listdir(tmp_path)) == 4


def test_load_split_generates_an_entry_once_for_parallel_jobs(tmp_path, monkeypatch):
    """Jobs of a sweep starting together: the first generates under the lock, the others wait for its entry."""
    params = dict(split="train", seed=2, num_examples=16, cache_dir=str(tmp_path), num_kv_pairs=2, seq_len=16)
    make_task, calls = tasks.make_task, []

    def slow_make_task(*args, **kwargs):
        calls.append(args)
        time.sleep(0.5)  # the other jobs reach the lock while this one generates
        return make_task(*args, **kwargs)
    monkeypatch.setattr(tasks, "make_task", slow_make_task)
    start = threading.Barrier(3)
    results = [None] * 3

    def job(index):
        start.wait()
        results[index] = tasks.load_split("mqar", **params)  # each job opens the lock file itself
    threads = [threading.Thread(target=job, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    expected = make_task("mqar", seed=tasks.task_seed(2, "train"), num_examples=16, num_kv_pairs=2, seq_len=16)
    assert all(torch.equal(result[column], expected[column]) for result in results for column in expected)
    entry, lock = sorted(os.listdir(tmp_path))
    assert lock == f"{entry}.lock"


def test_load_split_replaces_what_a_dead_job_left_half_written(tmp_path):
    params = dict(split="test", seed=1, num_examples=16, cache_dir=str(tmp_path))
    expected = tasks.load_split("copy", **params)
    entry = os.path.join(tmp_path, next(name for name in os.listdir(tmp_path) if not name.endswith(".lock")))
    os.rename(entry, f"{entry}.tmp")  # as if the job died before its rename, halfway through a larger write
    for shard in ("data-00000-of-00001.arrow", "data-00001-of-00002.arrow"):
        with open(os.path.join(f"{entry}.tmp", shard), "wb") as partial:
            partial.write(b"truncated")
    batch = tasks.load_split("copy", **params)
    assert all(torch.equal(batch[column], expected[column]) for column in expected)
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(entry), os.path.basename(entry) + ".lock"])
    assert "data-00001-of-00002.arrow" not in os.listdir(entry)  # the dead job's files are gone, not carried over


@pytest.mark.parametrize("module", [tasks.copy, tasks.reverse, tasks.mqar, tasks.selective_copy, tasks.needle,
                                    tasks.parity, tasks.modular_arithmetic, tasks.permutation])
def test_docstring_examples_are_real_rows(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_imports_without_gdn_exp_hydra_or_datasets():
    code = ("import sys, tasks; tasks.make_task('copy', seed=0, num_examples=2); "
            "print(sorted(m for m in ('gdn_exp', 'hydra', 'datasets') if m in sys.modules))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
