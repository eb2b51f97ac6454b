"""Language modelling on text: tokenizing once into the cached token file (uint16 / uint32, reused, bounded
memory), the rows read from it (inside the split, labels shifted by one, train and test disjoint), the file
formats and a dataset through `datasets.load_dataset` (streamed or not), documents that never attend across a
boundary (varlen), and short `task=lm` runs that train and evaluate."""
import json
import pickle
import tracemalloc

import datasets
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import gdn_exp.data.lm as lm
from gdn_exp.data import (CORPUS_PATH, ByteTokenizer, LMTaskConfig, PackedDocuments, TokenRows, check_lm_config,
                          document_cu_seqlens, load_lm_splits)
from gdn_exp.data.make_corpus import corpus_text
from gdn_exp.model import LanguageModel, ModelConfig
from gdn_exp.train import run_job
from gdn_exp.train.data import StreamedSplit, batch_indices

DOCUMENTS = ["The mill stood by the river.", "Snow fell on Greyhaven, and the bell rang twice.",
             "Bread, honey and a blue scarf: ünïcödé too."]


def task(**fields):
    return OmegaConf.structured(LMTaskConfig(**fields))


def byte_stream(documents):
    return [i for d in documents for i in ByteTokenizer().encode(d)]


def test_byte_tokenizer_round_trip():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(DOCUMENTS[2])
    assert ids[0] == tokenizer.bos_id == 256 and max(ids[1:]) < 256
    assert tokenizer.decode(ids) == DOCUMENTS[2]
    assert tokenizer.encode_batch(DOCUMENTS).tolist() == byte_stream(DOCUMENTS)


def write_formats(tmp_path):
    """The same documents as a text file (one per paragraph), jsonl, parquet and a save_to_disk dir."""
    (tmp_path / "docs.txt").write_text("\n\n".join(DOCUMENTS) + "\n")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS))
    dataset = datasets.Dataset.from_dict({"text": DOCUMENTS})
    dataset.to_parquet(str(tmp_path / "docs.parquet"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    return ["docs.txt", "docs.jsonl", "docs.parquet", "saved"]


def all_rows(split: TokenRows) -> np.ndarray:
    return split.read(np.arange(len(split)))


@pytest.mark.parametrize("streaming", [False, True], ids=["arrow", "streamed"])
def test_every_format_gives_the_same_rows(tmp_path, streaming):
    loaded = [lm.lm_token_rows(task(path=str(tmp_path / name), seq_len=8, val_fraction=0.2, streaming=streaming),
                               cache_dir=str(tmp_path / "c")) for name in write_formats(tmp_path)]
    stream = byte_stream(DOCUMENTS)
    cut = int(len(stream) * 0.8)
    train, test = all_rows(loaded[0]["train"]), all_rows(loaded[0]["test"])
    assert len(train) == (cut - 1) // 8 and len(test) == (len(stream) - cut - 1) // 8
    assert train[:, :-1].flatten().tolist() == stream[: len(train) * 8]   # rows of 8 inputs, one after another
    assert test[0].tolist() == stream[cut : cut + 9]
    for other in loaded[1:]:
        for split in ("train", "test"):
            assert np.array_equal(all_rows(other[split]), all_rows(loaded[0][split]))


def test_rows_lie_inside_their_split_and_labels_are_inputs_shifted(tmp_path):
    rows = lm.lm_token_rows(task(seq_len=64), cache_dir=str(tmp_path))
    train, test = rows["train"], rows["test"]
    assert train.start == 0 and train.end == test.start and test.end == train.num_tokens
    assert train.start + len(train) * 64 + 1 <= train.end    # the last train row's last label is a train token
    assert test.start + len(test) * 64 + 1 <= test.end
    start = byte_stream([corpus_text()[:10]])  # the corpus starts with BOS and its first bytes
    assert train.read([0])[0, :11].tolist() == start
    index = np.array([0, 5, len(train) - 1])
    windows = train.read(index)
    assert windows.dtype == np.int64 and windows.shape == (3, 65)
    for row, i in zip(windows, index):
        assert np.array_equal(row, train.tokens[i * 64 : i * 64 + 65])
    for bad in ([len(train)], [-1]):
        with pytest.raises(IndexError):
            train.read(bad)
    tensors = test.tensors(max_rows=3)
    assert tensors["input_ids"].shape == (3, 64)
    assert torch.equal(tensors["labels"][:, :-1], tensors["input_ids"][:, 1:])
    assert tensors["input_ids"][0, 0] == int(test.tokens[test.start])


def test_the_cache_is_written_once_then_reused(tmp_path, monkeypatch):
    first = load_lm_splits(task(seq_len=32), cache_dir=str(tmp_path))
    entries = [p for p in tmp_path.iterdir() if p.name.startswith("lm-") and p.is_dir()]
    assert len(entries) == 1 and sorted(p.name for p in entries[0].iterdir()) == ["index.json", "tokens.bin"]
    assert not list(tmp_path.glob("*.tmp"))
    index = json.loads((entries[0] / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["num_tokens"] == (entries[0] / "tokens.bin").stat().st_size // 2
    assert index["splits"]["train"]["documents"] == 800

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(lm, "open_documents", no_tokenizing)
    again = load_lm_splits(task(seq_len=16, val_fraction=0.1, num_test=4), cache_dir=str(tmp_path))  # same entry
    assert again["train"].path == first["train"].path and len(again["test"]["input_ids"]) == 4
    (tmp_path / "other.txt").write_text(corpus_text())
    with pytest.raises(AssertionError, match="tokenized again"):  # another source is another entry
        load_lm_splits(task(path=str(tmp_path / "other.txt")), cache_dir=str(tmp_path))


def test_tokenizing_and_loading_keep_the_corpus_out_of_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(lm, "CHARACTERS_PER_BATCH", 2 ** 18)  # a batch well under the corpus
    paragraph = " ".join(["The miller counted the sheep by the river, and the bell rang twice."] * 8)
    datasets.Dataset.from_dict({"text": [f"{i} {paragraph}" for i in range(16_000)]}).save_to_disk(
        str(tmp_path / "saved"))  # read back memory-mapped: 8.8 MB of text
    config = task(path=str(tmp_path / "saved"), seq_len=128, num_test=16)
    tracemalloc.start()
    try:
        load_lm_splits(config, cache_dir=str(tmp_path / "c"))                # tokenizes
        written = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        splits = load_lm_splits(config, cache_dir=str(tmp_path / "c"))      # reads the cache
        loaded = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    train = splits["train"]
    assert isinstance(train.tokens, np.memmap) and train.tokens.dtype == np.uint16
    file_bytes = train.path.stat().st_size
    assert len(train) * 128 > 0.9 * file_bytes / 2
    # a batch of documents at a time: well under the uint16 file, let alone the corpus as int64 (4x the file)
    assert written < file_bytes / 2 and loaded < file_bytes / 50, (written, loaded, file_bytes)
    assert len(pickle.dumps(train)) < 10_000  # a worker process gets the file's path, not its tokens


def word_tokenizer(tmp_path, words):
    """A local Hugging Face tokenizer of 70,000 + len(words) ids whose words have ids above 65,535."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<bos>": 0, "<unk>": 1, **{f"filler{i}": i for i in range(2, 70_000)}}
    vocab.update({word: 70_000 + i for i, word in enumerate(words)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", unk_token="<unk>"
                                         ).save_pretrained(str(tmp_path / "tokenizer"))
    return str(tmp_path / "tokenizer"), len(vocab)


def test_a_large_vocabulary_is_stored_as_uint32_and_round_trips(tmp_path):
    documents = ["the mill stood by the river", "snow fell and the bell rang twice", "bread and honey"]
    path, vocab_size = word_tokenizer(tmp_path, sorted({w for d in documents for w in d.split()}))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    config = task(path=str(tmp_path / "docs.jsonl"), tokenizer=path, vocab_size=vocab_size, seq_len=2,
                  val_fraction=0.3)
    check_lm_config(config)
    train = lm.lm_token_rows(config, cache_dir=str(tmp_path / "c"))["train"]
    assert train.tokens.dtype == np.uint32
    tokens = np.asarray(train.tokens)
    assert tokens.max() >= 70_000
    tokenizer = lm.make_tokenizer(path)
    starts = np.flatnonzero(tokens == tokenizer.bos_id).tolist() + [len(tokens)]
    assert [tokenizer.decode(tokens[a + 1 : b].tolist()) for a, b in zip(starts, starts[1:])] == documents


def test_byte_tokens_round_trip_through_the_file(tmp_path):
    (tmp_path / "docs.txt").write_text("\n\n".join(DOCUMENTS))
    train = lm.lm_token_rows(task(path=str(tmp_path / "docs.txt"), seq_len=4, val_fraction=0.2),
                             cache_dir=str(tmp_path / "c"))["train"]
    tokens = np.asarray(train.tokens).tolist()
    starts = [i for i, t in enumerate(tokens) if t == 256] + [len(tokens)]
    assert [ByteTokenizer().decode(tokens[a:b]) for a, b in zip(starts, starts[1:])] == DOCUMENTS


def write_dataset_dir(tmp_path):
    """A local dataset directory in the Hub's layout: train.jsonl and validation.jsonl."""
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n"
                                                         for i, d in enumerate(DOCUMENTS[:2] * 20)))
    (tmp_path / "ds" / "validation.jsonl").write_text(json.dumps({"body": DOCUMENTS[2], "id": 0}) + "\n")
    return str(tmp_path / "ds")


@pytest.mark.parametrize("streaming", ["auto", True, False])
def test_a_dataset_goes_through_load_dataset(tmp_path, monkeypatch, streaming):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))  # where streaming=false writes
    calls = []
    real_load = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or real_load(*a, **k))
    config = task(dataset=write_dataset_dir(tmp_path), text_field="body", seq_len=8, streaming=streaming)
    check_lm_config(config)
    rows = lm.lm_token_rows(config, cache_dir=str(tmp_path / "c"))
    assert calls[0][0] == (config.dataset, None) and calls[0][1]["streaming"] == (streaming is not False)
    index = json.loads((rows["train"].path.parent / "index.json").read_text())
    assert index["streamed"] == (streaming is not False)   # auto: a local dir has no reported size
    stream = byte_stream(DOCUMENTS[:2] * 20 + DOCUMENTS[2:])
    assert np.asarray(rows["train"].tokens).tolist() == stream
    train_tokens = len(stream) - len(ByteTokenizer().encode(DOCUMENTS[2]))
    assert rows["train"].end == rows["test"].start == train_tokens   # the validation split is held out whole
    assert all_rows(rows["test"])[0].tolist() == stream[train_tokens : train_tokens + 9]
    with pytest.raises(ValueError, match="task.split=dev is not a split"):
        lm.lm_token_rows(task(dataset=config.dataset, split="dev", text_field="body"), cache_dir=str(tmp_path / "d"))
    with pytest.raises(ValueError, match="task.text_field=text is not a column"):
        lm.lm_token_rows(task(dataset=config.dataset, streaming=streaming), cache_dir=str(tmp_path / "e"))


def test_a_missing_dataset_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # never the network
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    missing_dir = str(tmp_path / "no_such_dataset")
    for streaming in ("auto", False):
        with pytest.raises(ValueError, match=f"task.dataset={missing_dir}: "):
            lm.lm_token_rows(task(dataset=missing_dir, streaming=streaming), cache_dir=str(tmp_path / "c"))


def test_streaming_auto_follows_the_size(tmp_path, monkeypatch):
    (tmp_path / "docs.txt").write_text("\n\n".join(DOCUMENTS))
    config = task(path=str(tmp_path / "docs.txt"))
    assert lm.resolve_streaming(config) is False
    monkeypatch.setattr(lm, "STREAM_ABOVE", 10)
    assert lm.resolve_streaming(config) is True
    assert lm.resolve_streaming(task(path=str(tmp_path / "docs.txt"), streaming=False)) is False


def test_a_validation_split_of_the_data_is_used(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCUMENTS[:2]}),
                          "validation": datasets.Dataset.from_dict({"text": DOCUMENTS[2:]})}
                         ).save_to_disk(str(tmp_path / "saved"))
    splits = load_lm_splits(task(path=str(tmp_path / "saved"), seq_len=4), cache_dir=str(tmp_path / "c"))
    assert splits["test"]["input_ids"].flatten().tolist() == ByteTokenizer().encode(DOCUMENTS[2])[: 4 * len(
        splits["test"]["input_ids"])]
    assert splits["train"].end - splits["train"].start == len(byte_stream(DOCUMENTS[:2]))


def test_streamed_split_copies_each_steps_rows_into_its_buffer(tmp_path):
    rows = load_lm_splits(task(seq_len=32), cache_dir=str(tmp_path))["train"]
    split = StreamedSplit(rows, seed=3, batch_size=4, device=torch.device("cpu"))
    for step in (0, 1, 7):
        indices = split(step)
        expected = rows.read(batch_indices(step, seed=3, batch_size=4, num_examples=len(rows)).numpy())
        input_ids, positions, labels = split.batch(indices)
        assert indices.tolist() == [0, 1, 2, 3] and positions is None and len(split) == 4
        assert input_ids.tolist() == expected[:, :-1].tolist() and labels.tolist() == expected[:, 1:].tolist()


@pytest.mark.parametrize("change, message", [
    ({"path": "no/such/file.txt"}, "task.path=no/such/file.txt"),
    ({"vocab_size": 100}, "task.vocab_size=100"),
    ({"format": "csv"}, "task.format=csv"),
    ({"val_fraction": 1.5}, "task.val_fraction=1.5"),
    ({"tokenizer": "no/such/tokenizer"}, "task.tokenizer=no/such/tokenizer"),
    ({"path": str(CORPUS_PATH), "dataset": "wikitext"}, "task.path=.* and task.dataset=wikitext"),
    ({"dataset": " "}, "task.dataset=' '"),
    ({"streaming": "sometimes"}, "task.streaming=sometimes"),
    ({"streaming": 1}, "task.streaming=1"),
    ({"num_test": 0}, "task.num_test=0"),
])
def test_bad_lm_config_names_the_key(change, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace(r"\.*", ".*")):
        check_lm_config(task(**change))


def test_a_missing_transformers_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(lm, "have", lambda module: module != "transformers")
    with pytest.raises(ValueError, match=r"task\.tokenizer=.* needs transformers, which is not installed"):
        check_lm_config(task(tokenizer=str(tmp_path)))


def test_cu_seqlens_cut_at_bos_and_row_starts():
    input_ids = torch.tensor([[5, 256, 7, 8], [9, 9, 256, 1]])
    assert document_cu_seqlens(input_ids, bos_id=256).tolist() == [0, 1, 4, 6, 8]


@pytest.mark.parametrize("mixers", [dict(mixer="gdn"), dict(mixer="attention"), dict(attention_every=2)],
                         ids=["gdn", "attention", "hybrid"])
def test_packed_documents_do_not_see_each_other(mixers):
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=257, d_model=32, n_layers=2, num_heads=2, head_dim=16,
                                      **mixers), backend="torch").eval()
    tokenizer = ByteTokenizer()
    row = torch.tensor([i for d in DOCUMENTS[:2] for i in tokenizer.encode(d)])[None]   # [1, T]: two documents
    split = len(tokenizer.encode(DOCUMENTS[0]))
    with torch.no_grad():
        packed = PackedDocuments(model, tokenizer.bos_id)(row)
        separate = torch.cat([model(row[:, :split]), model(row[:, split:])], dim=1)
        together = model(row)
    torch.testing.assert_close(packed, separate, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(together[:, split:], separate[:, split:], atol=1e-3)  # without varlen they mix


def test_shipped_corpus_is_what_make_corpus_writes():
    assert CORPUS_PATH.read_text() == corpus_text()
    assert 200_000 < CORPUS_PATH.stat().st_size < 500_000


def test_lm_run_on_shipped_corpus_lowers_perplexity(compose, tmp_path):
    cfg = compose("task=lm", "task.seq_len=64", "task.varlen=true", "model=tiny", "logger=none",
                  "trainer.max_steps=40", "trainer.batch_size=8", "trainer.eval_interval=10",
                  "trainer.eval_batch_size=64", "trainer.num_threads=1", "task.num_test=32")
    results = run_job(cfg, tmp_path / "run")
    assert results["status"] == "completed", results
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    perplexity = [r["test/perplexity"] for r in rows if "test/perplexity" in r]
    assert len(perplexity) == 4 and perplexity[-1] < 0.5 * perplexity[0], perplexity


def test_lm_run_on_a_dataset_trains_and_evaluates(compose, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))  # its builder's lock file
    cfg = compose("task=lm", f"task.dataset={write_dataset_dir(tmp_path)}", "task.text_field=body",
                  "task.seq_len=16", "model=tiny", "logger=none", "trainer.max_steps=6", "trainer.batch_size=4",
                  "trainer.eval_interval=3", "trainer.num_threads=1")
    results = run_job(cfg, tmp_path / "run")
    assert results["status"] == "completed", results
    assert results["steps"] == 6 and results["test/perplexity"] > 1
    assert len(list((tmp_path / "cache").glob("lm-*/tokens.bin"))) == 1


def test_the_data_bench_times_the_data_path(tmp_path):
    from gdn_exp.dev.bench import bench_data

    rows = bench_data(num_tokens=50_000, batches=((2, 64),), steps=3, directory=tmp_path)
    assert [(r["batch"], r["page_cache"]) for r in rows] == [("2x64", "warm"), ("2x64", "cold")]
    assert all(r["read_ms"] > 0 and r["host_ms"] > 0 and r["batches_per_s"] > 0 for r in rows)
    assert not list(tmp_path.iterdir())  # the token file is removed


@pytest.mark.parametrize("name, content", [("binary.txt", bytes(range(128, 256)) * 8),
                                           ("broken.jsonl", b'{"text": "a"}\n{oops\n'),
                                           ("broken.parquet", b"not parquet" * 50)])
def test_a_file_that_does_not_read_as_its_format_is_one_line_naming_it(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    for streaming in (True, False):
        with pytest.raises(ValueError, match=f"task.path={tmp_path / name} does not read as "):
            lm.lm_token_rows(task(path=str(tmp_path / name), streaming=streaming), cache_dir=str(tmp_path / "c"))
