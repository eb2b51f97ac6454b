"""Language modelling on text (`task=lm`): documents from local files or a Hugging Face dataset, tokenized once
into a memory-mapped token file, and rows of seq_len + 1 tokens read from it per batch.

    splits = load_lm_splits(LMTaskConfig(seq_len=256), cache_dir="outputs/cache/tasks")
    splits["train"]                            # TokenRows: the train rows, read from the token file per batch
    splits["train"].read(np.array([0, 7]))     # int64 [2, 257]: input_ids = rows[:, :-1], labels = rows[:, 1:]
    splits["test"]["input_ids"], splits["test"]["labels"]   # LongTensor [num_test, seq_len], in memory

Every document starts with the tokenizer's BOS id and the documents are concatenated into one token stream;
row r of a split is its tokens [r L, (r + 1) L + 1) (L = seq_len: rows overlap by the one token that the last
label needs), so `labels[:, t]` is the stream's next token and every position is scored. With `varlen`,
`PackedDocuments` runs the model on a batch as one packed sequence with cu_seqlens cut at every BOS and every row
start, so no token attends across a document boundary.

Sources: `task.path`, local files (text: one document per blank-line-separated paragraph; json/jsonl and parquet:
one document per row's `text_field`) or a save_to_disk directory; or `task.dataset`, a Hugging Face dataset
(`datasets.load_dataset(dataset, dataset_config)`, its split `task.split`; also a local dataset directory);
neither: the shipped corpus. `datasets` streams a source (reads it while tokenizing, no Arrow copy on disk) when
`task.streaming` says so; auto streams one over STREAM_ABOVE bytes or of unknown size.

Cache: `<cache_dir>/lm-<md5 of the source (files: names, sizes, mtimes), text_field and tokenizer>/` holds
`tokens.bin` (uint16 when the tokenizer has at most 65536 ids, else uint32) and `index.json` (dtype, the token
range and document count of each source split, the source, the tokenizer). It is written once, a batch of
documents at a time (memory stays bounded), into `<entry>.tmp` and renamed, under an flock on `<entry>.lock`
(parallel jobs wait, then read it), as `tasks.load_split` does. seq_len, val_fraction and num_test are not
part of the key: they only choose rows of the same file. A Hub dataset's key is its name, configuration and
split, not its revision: delete the entry to tokenize a dataset that changed upstream.

Held-out split: the data's own validation (or test) split when it has one (it follows the train split in
tokens.bin); otherwise the last `val_fraction` of the train split's tokens. The train rows never reach into it.
Evaluation uses the first `num_test` rows of the held-out split, kept in memory; training reads its rows from
the memory map, so the corpus is never held in RAM.
"""
import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

import tasks
from gdn_exp.extras import have, missing

log = logging.getLogger(__name__)

CORPUS_PATH = Path(__file__).parent / "corpus" / "village_stories.txt"
FORMATS = ("auto", "text", "json", "parquet", "saved")
EXTENSION_FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
                     ".parquet": "parquet"}
VALIDATION_SPLITS = ("validation", "test")
STREAM_ABOVE = 2 ** 30      # bytes: streaming=auto streams a source larger than this (or of unknown size)
DOCUMENTS_PER_READ = 256    # documents `datasets` hands over at a time
CHARACTERS_PER_BATCH = 2 ** 22  # tokenized and written at a time (about: whole documents)
CACHE_FORMAT = 1            # part of the cache key: bump when the token file's layout or content changes


@dataclass
class LMTaskConfig:
    """The `task` node of task=lm (registered as its Hydra schema)."""

    name: str = "lm"
    path: Optional[str] = None      # local data: a file, a directory of files or a save_to_disk dir
    format: str = "auto"            # of path: auto (extension / save_to_disk dir) | text | json | parquet | saved
    dataset: Optional[str] = None   # or a Hugging Face dataset (name or local dir); both null: the shipped corpus
    dataset_config: Optional[str] = None  # the dataset's configuration (load_dataset's second argument)
    split: str = "train"            # the dataset's split to train on (its validation or test split is held out)
    streaming: Any = "auto"         # auto (sources over 1 GiB or of unknown size) | true | false: read while tokenizing
    text_field: str = "text"        # the column holding the text (json, parquet, saved, dataset)
    tokenizer: str = "byte"         # byte (UTF-8 bytes + BOS) | path to a local Hugging Face tokenizer directory
    vocab_size: int = 257           # model vocabulary: at least the tokenizer's (byte: 256 bytes + BOS)
    seq_len: int = 256              # tokens per training row
    val_fraction: float = 0.05      # share of the train tokens held out when the data has no validation split
    num_test: Optional[int] = 512   # held-out rows evaluated each time: at most this many (null: all)
    varlen: bool = False            # documents never attend across boundaries (cu_seqlens at each BOS)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and BOS = 256, which starts every document."""

    bos_id = 256
    vocab_size = 257
    description = {"name": "byte"}

    def encode(self, text: str) -> list[int]:
        return [self.bos_id, *text.encode("utf-8")]

    def encode_batch(self, texts: list) -> np.ndarray:
        """The documents' ids, each starting with BOS, concatenated: uint16 [num_tokens]."""
        bos = np.array([self.bos_id], dtype=np.uint16)
        pieces = [piece for text in texts for piece in (bos, np.frombuffer(text.encode("utf-8"), np.uint8))]
        return np.concatenate(pieces) if pieces else np.zeros(0, np.uint16)

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local Hugging Face tokenizer directory; its bos token (else its eos token) starts every document."""

    def __init__(self, path: str):
        if not Path(path).is_dir():
            raise ValueError(f"task.tokenizer={path} is neither 'byte' nor a local tokenizer directory")
        if not have("transformers"):
            raise ValueError(missing("transformers", f"task.tokenizer={path}") + ", or use task.tokenizer=byte")
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        bos_id = self.tokenizer.bos_token_id
        self.bos_id = self.tokenizer.eos_token_id if bos_id is None else bos_id
        if self.bos_id is None:
            raise ValueError(f"task.tokenizer={path} has neither a bos nor an eos token to separate documents")
        self.vocab_size = len(self.tokenizer)
        self.description = {"path": str(Path(path).resolve()), "files": file_stats(Path(path)),
                            "vocab_size": self.vocab_size}

    def encode(self, text: str) -> list[int]:
        return [self.bos_id, *self.tokenizer.encode(text, add_special_tokens=False)]

    def encode_batch(self, texts: list) -> np.ndarray:
        """The documents' ids, each starting with BOS, concatenated: int64 [num_tokens]."""
        encoded = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        count = sum(len(ids) + 1 for ids in encoded)
        return np.fromiter(itertools.chain.from_iterable(itertools.chain((self.bos_id,), ids) for ids in encoded),
                           dtype=np.int64, count=count)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)


def make_tokenizer(name: str):
    return ByteTokenizer() if name == "byte" else HFTokenizer(name)


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype of the token file for a tokenizer with `vocab_size` ids."""
    return np.dtype(np.uint16 if vocab_size <= 2 ** 16 else np.uint32)


def data_format(path: Path, format: str) -> str:
    """The loader for `path`: `format` itself, or for auto a save_to_disk dir ("saved") or the file extension."""
    if format not in FORMATS:
        raise ValueError(f"task.format={format} must be one of {', '.join(FORMATS)}")
    if format != "auto":
        return format
    if path.is_dir() and any((path / name).is_file() for name in ("dataset_dict.json", "dataset_info.json")):
        return "saved"
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    found = {EXTENSION_FORMATS[p.suffix] for p in files if p.suffix in EXTENSION_FORMATS}
    if len(found) != 1:
        raise ValueError(f"task.path={path}: cannot tell the format from the file extensions "
                         f"({', '.join(sorted({p.suffix for p in files})) or 'no files'}); set task.format")
    return found.pop()


def check_lm_config(task) -> None:
    """Start-up checks of a task=lm config node; raises ValueError naming the key."""
    for key in ("path", "dataset", "dataset_config", "split", "text_field", "tokenizer"):  # "" would mean "."
        value = task[key]
        if value is not None and not str(value).strip():
            raise ValueError(f"task.{key}={value!r} is empty; give "
                             + {"path": "a file or directory, or task.path=null",
                                "dataset": "a dataset name, or task.dataset=null",
                                "dataset_config": "a configuration name, or task.dataset_config=null",
                                "split": "the dataset's split to train on (train)",
                                "text_field": "the column holding the text",
                                "tokenizer": "byte or a local tokenizer directory"}[key])
    if task.path is not None and task.dataset is not None:
        raise ValueError(f"task.path={task.path} and task.dataset={task.dataset}: give one of them (the other null)")
    if task.path is not None or task.dataset is None:
        path = Path(task.path) if task.path is not None else CORPUS_PATH
        if not path.exists():
            raise ValueError(f"task.path={task.path} does not exist")
        data_format(path, task.format)
    if not (task.streaming == "auto" or isinstance(task.streaming, bool)):
        raise ValueError(f"task.streaming={task.streaming} must be auto, true or false")
    if task.seq_len < 1:
        raise ValueError(f"task.seq_len={task.seq_len} must be >= 1")
    if not 0 < task.val_fraction < 1:  # NaN fails too
        raise ValueError(f"task.val_fraction={task.val_fraction} must be in (0, 1)")
    if task.num_test is not None and task.num_test < 1:
        raise ValueError(f"task.num_test={task.num_test} must be >= 1 or null")
    tokenizer = make_tokenizer(task.tokenizer)
    if task.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"task.vocab_size={task.vocab_size} is smaller than the vocabulary of "
                         f"task.tokenizer={task.tokenizer} ({tokenizer.vocab_size}); set task.vocab_size="
                         f"{tokenizer.vocab_size}")


# ---- the source: what the cache key hashes, and its documents ----

def file_stats(path: Path, files: Optional[list] = None) -> list:
    """[[name, size, mtime_ns], ...] of `files` (default: the file `path`, or every file under the directory),
    named relative to the directory `path`."""
    if files is None:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p.relative_to(path)) if path.is_dir() else p.name, p.stat().st_size, p.stat().st_mtime_ns]
            for p in files]


def local_files(path: Path, kind: str) -> list[Path]:
    """The data files of task.path: the file, or the files directly in the directory (all of a saved dir)."""
    if path.is_file():
        return [path]
    return sorted(p for p in (path.rglob("*") if kind == "saved" else path.iterdir()) if p.is_file())


def describe_source(task) -> dict:
    """What the documents are, for the cache key: the local files (names, sizes, mtimes) or the dataset's name,
    configuration and split (and its files when it is a local directory)."""
    if task.dataset is not None:
        source = {"dataset": task.dataset, "config": task.dataset_config, "split": task.split}
        if Path(task.dataset).exists():
            source["files"] = file_stats(Path(task.dataset))
        return source
    path = Path(task.path) if task.path is not None else CORPUS_PATH
    kind = data_format(path, task.format)
    return {"path": str(path.resolve()), "format": kind, "files": file_stats(path, local_files(path, kind))}


def resolve_streaming(task) -> bool:
    """task.streaming, with auto decided by the source's size: local files by their bytes, a dataset by the size
    its card reports (unknown: stream). A save_to_disk dir is read in place (memory-mapped), never streamed."""
    if task.dataset is None:
        path = Path(task.path) if task.path is not None else CORPUS_PATH
        kind = data_format(path, task.format)
        if kind == "saved":
            return False
        if task.streaming != "auto":
            return bool(task.streaming)
        return sum(p.stat().st_size for p in local_files(path, kind)) > STREAM_ABOVE
    if task.streaming != "auto":
        return bool(task.streaming)
    import datasets

    with dataset_errors(task):
        info = datasets.load_dataset_builder(task.dataset, task.dataset_config).info
    size = info.dataset_size or info.download_size
    return size is None or size > STREAM_ABOVE


@contextlib.contextmanager
def dataset_errors(task):
    """`datasets` failing to find or read the dataset (or its configuration) as one line naming the key."""
    try:
        yield
    except (FileNotFoundError, ValueError) as e:  # no such dataset or files; a configuration it does not have
        key = f"task.dataset={task.dataset}" + (f" task.dataset_config={task.dataset_config}"
                                                 if task.dataset_config is not None else "")
        raise ValueError(f"{key}: {str(e).strip().splitlines()[0]}") from None


@contextlib.contextmanager
def file_errors(task):
    """A local task.path that does not read as its format (binary bytes in a .txt, a broken .jsonl or .parquet) as
    one line naming the key, whether `datasets` fails while loading it or, streamed, while it is read."""
    import datasets
    import pyarrow

    try:
        yield
    except (datasets.exceptions.DatasetGenerationError, UnicodeDecodeError, pyarrow.ArrowException) as e:
        if task.path is None:
            raise
        cause = e.__cause__ or e.__context__ or e if isinstance(e, datasets.exceptions.DatasetGenerationError) else e
        raise ValueError(f"task.path={task.path} does not read as {data_format(Path(task.path), task.format)}: "
                         f"{type(cause).__name__}: {str(cause).strip().splitlines()[0][:160] if str(cause) else ''}"
                         ) from None


def open_documents(task, cache_dir: str, streaming: bool) -> dict:
    """{"train": documents, "validation": documents (only when the data has a validation or test split)}, each a
    datasets.Dataset or, streamed, a datasets.IterableDataset."""
    import datasets

    if task.dataset is not None:
        with dataset_errors(task):
            loaded = datasets.load_dataset(task.dataset, task.dataset_config, streaming=streaming)
        if task.split not in loaded:
            raise ValueError(f"task.split={task.split} is not a split of task.dataset={task.dataset} "
                             f"(splits: {', '.join(loaded)})")
        train_name = task.split
    else:
        path = Path(task.path) if task.path is not None else CORPUS_PATH
        kind = data_format(path, task.format)
        if kind == "saved":
            loaded = datasets.load_from_disk(str(path))
            loaded = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        else:
            options = {"sample_by": "paragraph"} if kind == "text" else {}
            loaded = datasets.load_dataset(kind, data_files=[str(p) for p in local_files(path, kind)],
                                           cache_dir=cache_dir, streaming=streaming, **options)
        train_name = "train"
    held_out = next((name for name in VALIDATION_SPLITS if name in loaded and name != train_name), None)
    return {"train": loaded[train_name], **({"validation": loaded[held_out]} if held_out else {})}


def text_batches(documents, text_field: str):
    """The texts of `documents` in lists of about CHARACTERS_PER_BATCH characters (so memory stays bounded however
    long the documents), stripped (a text file's last paragraph keeps its newline; surrounding whitespace carries
    nothing), empty ones dropped."""
    columns = documents.column_names
    if columns is not None and text_field not in columns:
        raise ValueError(f"task.text_field={text_field} is not a column of the data (columns: {', '.join(columns)})")
    if columns is not None:
        documents = documents.select_columns([text_field])
    texts, characters = [], 0
    for batch in documents.iter(batch_size=DOCUMENTS_PER_READ):
        if text_field not in batch:
            raise ValueError(f"task.text_field={text_field} is not a column of the data "
                             f"(columns: {', '.join(batch)})")
        for text in batch[text_field]:
            if text and text.strip():
                texts.append(text.strip())
                characters += len(texts[-1])
        if characters >= CHARACTERS_PER_BATCH:
            yield texts
            texts, characters = [], 0
    if texts:
        yield texts


def write_tokens(documents, tokenizer, text_field: str, file, dtype: np.dtype) -> dict:
    """Tokenizes `documents` a batch at a time and appends their ids to the open binary `file` as `dtype`;
    returns {"tokens": number written, "documents": number of documents}."""
    tokens = num_documents = 0
    next_report, start = 10 ** 8, time.perf_counter()
    for texts in text_batches(documents, text_field):
        ids = tokenizer.encode_batch(texts)
        ids.astype(dtype, copy=False).tofile(file)
        tokens, num_documents = tokens + len(ids), num_documents + len(texts)
        if tokens >= next_report:
            log.info("tokenized %s documents, %s tokens (%.0f K tokens/s)", f"{num_documents:,}", f"{tokens:,}",
                     tokens / (time.perf_counter() - start) / 1e3)
            next_report = (tokens // 10 ** 8 + 1) * 10 ** 8
    return {"tokens": tokens, "documents": num_documents}


def token_cache(task, cache_dir: str) -> Path:
    """The cache entry of task's documents and tokenizer (see the module docstring), written if missing."""
    tokenizer = make_tokenizer(task.tokenizer)
    source = describe_source(task)
    key = json.dumps({"source": source, "text_field": task.text_field, "tokenizer": tokenizer.description,
                      "format": CACHE_FORMAT}, sort_keys=True)
    path = Path(cache_dir) / f"lm-{hashlib.md5(key.encode()).hexdigest()}"
    tasks.write_once(str(path), lambda _: write_entry(task, tokenizer, source, path, cache_dir))
    return path


def write_entry(task, tokenizer, source: dict, path: Path, cache_dir: str) -> None:
    """Tokenizes the documents into path.tmp/tokens.bin and index.json, then renames it to `path`; call under
    the lock."""
    start = time.time()
    streaming = resolve_streaming(task)
    with file_errors(task):
        splits = open_documents(task, cache_dir, streaming)
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = Path(f"{path}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a job that died mid-write: only the lock holder writes
    tmp.mkdir()
    ranges, end = {}, 0
    log.info("tokenizing %s into %s (%s, %sstreamed)", source.get("dataset") or source["path"], path, dtype.name,
             "" if streaming else "not ")
    with open(tmp / "tokens.bin", "wb") as file:
        for name, documents in splits.items():
            with file_errors(task):
                counts = write_tokens(documents, tokenizer, task.text_field, file, dtype)
            if counts["tokens"] == 0:
                raise ValueError(f"task.text_field={task.text_field}: the {name} split of the data has no text")
            ranges[name] = {"start": end, "end": end + counts["tokens"], "documents": counts["documents"]}
            end += counts["tokens"]
    index = {"format": CACHE_FORMAT, "dtype": dtype.name, "num_tokens": end, "bos_id": tokenizer.bos_id,
             "tokenizer_vocab_size": tokenizer.vocab_size, "splits": ranges, "source": source,
             "text_field": task.text_field, "tokenizer": tokenizer.description, "streamed": streaming,
             "seconds": round(time.time() - start, 3)}
    (tmp / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    os.rename(tmp, path)
    log.info("tokenized %s tokens in %.1f s", f"{end:,}", time.time() - start)


# ---- rows of the token file ----

class TokenRows:
    """Rows of seq_len + 1 tokens of the token file's range [start, end): row r is tokens [start + r L,
    start + (r + 1) L + 1), L = seq_len. The file is memory-mapped when first read (and again after pickling);
    `read` copies only the rows asked for."""

    def __init__(self, path: Path, dtype: str, num_tokens: int, start: int, end: int, seq_len: int):
        self.path, self.dtype, self.num_tokens = Path(path), np.dtype(dtype), num_tokens
        self.start, self.end, self.seq_len = start, end, seq_len
        self._tokens = None

    @property
    def tokens(self) -> np.memmap:
        """The whole token file, memory-mapped read-only: [num_tokens] of dtype."""
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        return self._tokens

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None}

    def __len__(self) -> int:
        return max(0, (self.end - self.start - 1) // self.seq_len)

    def read(self, index, out: Optional[np.ndarray] = None) -> np.ndarray:
        """The rows `index` (ints [n]) as int64 [n, seq_len + 1], into `out` when given."""
        index = np.asarray(index, dtype=np.int64)
        if len(index) and not (0 <= index.min() and index.max() < len(self)):
            raise IndexError(f"row index out of range [0, {len(self)})")
        if out is None:
            out = np.empty((len(index), self.seq_len + 1), dtype=np.int64)
        tokens, width = self.tokens, self.seq_len + 1
        for i, offset in enumerate((self.start + index * self.seq_len).tolist()):
            out[i] = tokens[offset : offset + width]
        return out

    def tensors(self, max_rows: Optional[int] = None) -> dict:
        """The first max_rows rows (null: all) in memory: {"input_ids", "labels"}: LongTensor [n, seq_len]."""
        rows = torch.from_numpy(self.read(np.arange(min(len(self), max_rows or len(self)))))
        return {"input_ids": rows[:, :-1].contiguous(), "labels": rows[:, 1:].contiguous()}


def lm_token_rows(task, cache_dir: str) -> dict:
    """{"train": TokenRows, "test": TokenRows} of task's token cache (written first if missing)."""
    path = token_cache(task, cache_dir)
    index = json.loads((path / "index.json").read_text())
    ranges = {name: (r["start"], r["end"]) for name, r in index["splits"].items()}
    train_start, train_end = ranges["train"]
    if "validation" in ranges:
        held_out = ranges["validation"]
    else:  # the last val_fraction of the train tokens
        cut = train_start + int((train_end - train_start) * (1 - task.val_fraction))
        (train_start, train_end), held_out = (train_start, cut), (cut, train_end)
    rows = {name: TokenRows(path / "tokens.bin", index["dtype"], index["num_tokens"], start, end, task.seq_len)
            for name, (start, end) in (("train", (train_start, train_end)), ("test", held_out))}
    for name, split in rows.items():
        if len(split) == 0:
            raise ValueError(f"task.seq_len={task.seq_len}: the {name} split has fewer than seq_len + 1 tokens "
                             f"(lower task.seq_len or raise task.val_fraction)")
    log.info("task=lm: %s (%s): train tokens [%d, %d) in %s rows, held-out tokens [%d, %d) (%s)", path.name,
             index["dtype"], train_start, train_end, f"{len(rows['train']):,}", *held_out,
             "the data's validation split" if "validation" in ranges else f"last {task.val_fraction} of train")
    return rows


def load_lm_splits(task, cache_dir: str) -> dict:
    """{"train": TokenRows (memory-mapped, read per batch), "test": {"input_ids", "labels"}: LongTensor
    [min(num_test, held-out rows), seq_len] in memory}."""
    rows = lm_token_rows(task, cache_dir)
    return {"train": rows["train"], "test": rows["test"].tensors(task.num_test)}


def document_cu_seqlens(input_ids: torch.Tensor, bos_id: int) -> torch.Tensor:
    """Boundaries of the documents in input_ids [B, T] flattened to one sequence: LongTensor [N + 1].

    A segment starts at every row start and at every BOS token, and the last one ends at B * T.
    """
    B, T = input_ids.shape
    flat = input_ids.reshape(-1)
    starts = (flat == bos_id) | (torch.arange(B * T, device=flat.device) % T == 0)
    end = torch.tensor([B * T], device=flat.device)
    return torch.cat([starts.nonzero().flatten(), end])


class PackedDocuments(nn.Module):
    """Calls `model` on input_ids [B, T] as one packed sequence [1, B * T] whose segments are the documents
    (see `document_cu_seqlens`); returns logits [B, T, vocab]. Holds no weights of its own."""

    def __init__(self, model: nn.Module, bos_id: int):
        super().__init__()
        self.model, self.bos_id = model, bos_id

    def forward(self, input_ids, positions=None):
        """input_ids [B, T]; positions [B, P] or None (all T), as in `LanguageModel.forward`."""
        B, T = input_ids.shape
        packed = None if positions is None else (positions + T * torch.arange(B, device=positions.device)[:, None])
        logits = self.model(input_ids.reshape(1, B * T), cu_seqlens=document_cu_seqlens(input_ids, self.bos_id),
                            positions=None if packed is None else packed.reshape(1, -1))
        return logits.view(B, -1, logits.shape[-1])
