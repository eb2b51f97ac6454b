"""Language modelling on local text (`task=lm`): load documents, tokenize, pack into fixed-length rows.

    splits = load_lm_splits(LMTaskConfig(seq_len=256), cache_dir="outputs/cache/tasks")
    splits["train"]["input_ids"], splits["train"]["labels"]     # LongTensor [num_rows, seq_len]

Every document starts with the tokenizer's BOS id and the documents are concatenated into one token
stream, cut into rows of seq_len tokens; `labels[:, t]` is the stream's next token (already shifted, every
position scored). With `varlen`, `PackedDocuments` runs the model on a batch as one packed sequence with
cu_seqlens cut at every BOS and every row start, so no token attends across a document boundary.

Data comes from `datasets.load_dataset` on local files (text: one document per blank-line-separated paragraph;
json/jsonl and parquet: one document per row's `text_field`) or `datasets.load_from_disk` on a save_to_disk
directory; nothing is fetched from the hub. A split named validation (or test) is used for evaluation when the
data has one; otherwise the last `val_fraction` of the token stream is held out.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

CORPUS_PATH = Path(__file__).parent / "corpus" / "village_stories.txt"
FORMATS = ("auto", "text", "json", "parquet", "saved")
EXTENSION_FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
                     ".parquet": "parquet"}
VALIDATION_SPLITS = ("validation", "test")


@dataclass
class LMTaskConfig:
    """The `task` node of task=lm (registered as its Hydra schema)."""

    name: str = "lm"
    path: Optional[str] = None      # a local file or directory of files, or a save_to_disk dir; null: shipped corpus
    format: str = "auto"            # auto (from the extension / a save_to_disk dir) | text | json | parquet | saved
    text_field: str = "text"        # the column holding the text (json, parquet, saved)
    tokenizer: str = "byte"         # byte (UTF-8 bytes + BOS) | path to a local Hugging Face tokenizer directory
    vocab_size: int = 257           # model vocabulary: at least the tokenizer's (byte: 256 bytes + BOS)
    seq_len: int = 256              # tokens per training row
    val_fraction: float = 0.05      # share of tokens held out when the data has no validation split
    num_test: Optional[int] = None  # at most this many validation rows (null: all)
    varlen: bool = False            # documents never attend across boundaries (cu_seqlens at each BOS)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and BOS = 256, which starts every document."""

    bos_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return [self.bos_id, *text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local Hugging Face tokenizer directory; its bos token (else its eos token) starts every document."""

    def __init__(self, path: str):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ValueError(f"task.tokenizer={path} needs the transformers package (pip install transformers), "
                             f"or use task.tokenizer=byte") from None
        if not Path(path).is_dir():
            raise ValueError(f"task.tokenizer={path} is neither 'byte' nor a local tokenizer directory")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        bos_id = self.tokenizer.bos_token_id
        self.bos_id = self.tokenizer.eos_token_id if bos_id is None else bos_id
        if self.bos_id is None:
            raise ValueError(f"task.tokenizer={path} has neither a bos nor an eos token to separate documents")
        self.vocab_size = len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return [self.bos_id, *self.tokenizer.encode(text, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)


def make_tokenizer(name: str):
    return ByteTokenizer() if name == "byte" else HFTokenizer(name)


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
    for key in ("path", "text_field", "tokenizer"):  # an empty string would mean the shipped corpus / "."
        value = task[key]
        if value is not None and not str(value).strip():
            raise ValueError(f"task.{key}={value!r} is empty; give "
                             + {"path": "a file or directory, or task.path=null for the shipped corpus",
                                "text_field": "the column holding the text",
                                "tokenizer": "byte or a local tokenizer directory"}[key])
    path = Path(task.path) if task.path is not None else CORPUS_PATH
    if not path.exists():
        raise ValueError(f"task.path={task.path} does not exist")
    data_format(path, task.format)
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


def load_documents(path: Path, format: str, cache_dir: str) -> dict:
    """{split name: datasets.Dataset} of the raw documents at `path`."""
    import datasets

    kind = data_format(path, format)
    if kind == "saved":
        loaded = datasets.load_from_disk(str(path))
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    files = sorted(str(p) for p in path.iterdir() if p.is_file()) if path.is_dir() else [str(path)]
    options = {"sample_by": "paragraph"} if kind == "text" else {}
    return dict(datasets.load_dataset(kind, data_files=files, cache_dir=cache_dir, **options))


def token_stream(documents, tokenizer, text_field: str) -> np.ndarray:
    """All documents' ids, each starting with BOS, concatenated: int64 [num_tokens]."""
    if text_field not in documents.column_names:
        raise ValueError(f"task.text_field={text_field} is not a column of the data "
                         f"(columns: {', '.join(documents.column_names)})")
    # surrounding whitespace carries nothing (a text file's last paragraph keeps its newline); empty docs are dropped
    encoded = documents.map(lambda batch: {"ids": [tokenizer.encode(t.strip()) for t in batch[text_field]
                                                   if t and t.strip()]},
                            batched=True, remove_columns=documents.column_names, desc="tokenizing")
    ids = encoded.data.column("ids").combine_chunks().flatten()   # pyarrow: no Python loop over tokens
    return ids.to_numpy().astype(np.int64)


def pack(stream: np.ndarray, seq_len: int, max_rows: Optional[int] = None) -> dict:
    """Cuts a token stream into rows: input_ids = stream[i L : (i+1) L], labels = the same shifted by one."""
    num_rows = (len(stream) - 1) // seq_len
    if max_rows is not None:
        num_rows = min(num_rows, max_rows)
    inputs = torch.from_numpy(stream[: num_rows * seq_len].reshape(num_rows, seq_len))
    labels = torch.from_numpy(stream[1 : num_rows * seq_len + 1].reshape(num_rows, seq_len))
    return {"input_ids": inputs, "labels": labels}


def load_lm_splits(task, cache_dir: str) -> dict:
    """{"train": ..., "test": ...}, each {"input_ids", "labels"}: LongTensor [num_rows, task.seq_len]."""
    tokenizer = make_tokenizer(task.tokenizer)
    splits = load_documents(Path(task.path) if task.path else CORPUS_PATH, task.format, cache_dir)
    train = token_stream(splits["train"], tokenizer, task.text_field)
    held_out = next((name for name in VALIDATION_SPLITS if name in splits), None)
    if held_out is not None:
        test = token_stream(splits[held_out], tokenizer, task.text_field)
    else:
        cut = int(len(train) * (1 - task.val_fraction))
        train, test = train[:cut], train[cut:]
    packed = {"train": pack(train, task.seq_len), "test": pack(test, task.seq_len, task.num_test)}
    for name, split in packed.items():
        if len(split["input_ids"]) == 0:
            raise ValueError(f"task.seq_len={task.seq_len}: the {name} split has fewer than seq_len + 1 tokens "
                             f"(lower task.seq_len or raise task.val_fraction)")
    return packed


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
