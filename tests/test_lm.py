"""Language modelling on local text: tokenizing, packing, the file formats, documents that never attend across
a boundary (varlen), and a short `task=lm` run on the shipped corpus that lowers validation perplexity."""
import json

import datasets
import pytest
import torch
from omegaconf import OmegaConf

from gdn_exp.data import (CORPUS_PATH, ByteTokenizer, LMTaskConfig, PackedDocuments, check_lm_config,
                          document_cu_seqlens, load_lm_splits)
from gdn_exp.data.lm import pack
from gdn_exp.data.make_corpus import corpus_text
from gdn_exp.model import LanguageModel, ModelConfig
from gdn_exp.train import run_job

DOCUMENTS = ["The mill stood by the river.", "Snow fell on Greyhaven, and the bell rang twice.",
             "Bread, honey and a blue scarf: ünïcödé too."]


def test_byte_tokenizer_round_trip():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(DOCUMENTS[2])
    assert ids[0] == tokenizer.bos_id == 256 and max(ids[1:]) < 256
    assert tokenizer.decode(ids) == DOCUMENTS[2]


def test_pack_shifts_labels_by_one_token():
    stream = torch.arange(23).numpy()
    rows = pack(stream, seq_len=5)
    assert rows["input_ids"].shape == rows["labels"].shape == (4, 5)
    assert torch.equal(rows["labels"].flatten(), rows["input_ids"].flatten() + 1)
    assert len(pack(stream, seq_len=5, max_rows=2)["input_ids"]) == 2


def write_formats(tmp_path):
    """The same documents as a text file (one per paragraph), jsonl, parquet and a save_to_disk dir."""
    (tmp_path / "docs.txt").write_text("\n\n".join(DOCUMENTS) + "\n")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS))
    dataset = datasets.Dataset.from_dict({"text": DOCUMENTS})
    dataset.to_parquet(str(tmp_path / "docs.parquet"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    return ["docs.txt", "docs.jsonl", "docs.parquet", "saved"]


def test_every_format_gives_the_same_rows(tmp_path):
    splits = [load_lm_splits(OmegaConf.structured(LMTaskConfig(path=str(tmp_path / name), seq_len=8,
                                                               val_fraction=0.2)), cache_dir=str(tmp_path / "c"))
              for name in write_formats(tmp_path)]
    stream = [i for d in DOCUMENTS for i in ByteTokenizer().encode(d)]
    cut = int(len(stream) * 0.8)
    assert splits[0]["train"]["input_ids"].flatten().tolist() == stream[: len(splits[0]["train"]["input_ids"]) * 8]
    assert splits[0]["test"]["input_ids"][0].tolist() == stream[cut : cut + 8]
    for other in splits[1:]:
        for split in ("train", "test"):
            assert torch.equal(other[split]["input_ids"], splits[0][split]["input_ids"])
            assert torch.equal(other[split]["labels"], splits[0][split]["labels"])


def test_a_validation_split_of_the_data_is_used(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCUMENTS[:2]}),
                          "validation": datasets.Dataset.from_dict({"text": DOCUMENTS[2:]})}
                         ).save_to_disk(str(tmp_path / "saved"))
    splits = load_lm_splits(OmegaConf.structured(LMTaskConfig(path=str(tmp_path / "saved"), seq_len=4)),
                            cache_dir=str(tmp_path / "c"))
    assert splits["test"]["input_ids"].flatten().tolist() == ByteTokenizer().encode(DOCUMENTS[2])[: 4 * len(
        splits["test"]["input_ids"])]


@pytest.mark.parametrize("change, message", [
    ({"path": "no/such/file.txt"}, "task.path=no/such/file.txt"),
    ({"vocab_size": 100}, "task.vocab_size=100"),
    ({"format": "csv"}, "task.format=csv"),
    ({"val_fraction": 1.5}, "task.val_fraction=1.5"),
    ({"tokenizer": "no/such/tokenizer"}, "task.tokenizer=no/such/tokenizer"),
])
def test_bad_lm_config_names_the_key(change, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        check_lm_config(OmegaConf.structured(LMTaskConfig(**change)))


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
