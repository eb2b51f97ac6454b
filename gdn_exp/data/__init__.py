"""Real-text data for language modelling (`task=lm`); see `gdn_exp.data.lm`."""
from .lm import (CORPUS_PATH, ByteTokenizer, LMTaskConfig, PackedDocuments, check_lm_config, document_cu_seqlens,
                 load_lm_splits, make_tokenizer)

__all__ = ["CORPUS_PATH", "ByteTokenizer", "LMTaskConfig", "PackedDocuments", "check_lm_config",
           "document_cu_seqlens", "load_lm_splits", "make_tokenizer"]
