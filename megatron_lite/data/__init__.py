"""Data pipeline: corpus readers, cleaning, tokenizers, indexed datasets, segmentation; the
pretraining objectives live in `megatron_lite.data.objectives`."""
from megatron_lite.data.cleaning import CleaningOptions, clean_text
from megatron_lite.data.indexed_dataset import (DatasetError, IndexedDataset,
                                                IndexedDatasetBuilder, merge_datasets,
                                                split_by_document)
from megatron_lite.data.readers import BadLineCounter, DataError, Document, read_documents
from megatron_lite.data.tokenizer import (CharTokenizer, SentencePieceTokenizer, Tokenizer,
                                          TokenizerError, check_tokenizer_hash, load_tokenizer)

__all__ = [
    "BadLineCounter", "CharTokenizer", "CleaningOptions", "DataError", "DatasetError", "Document",
    "IndexedDataset", "IndexedDatasetBuilder", "SentencePieceTokenizer", "Tokenizer",
    "TokenizerError", "check_tokenizer_hash", "clean_text", "load_tokenizer", "merge_datasets",
    "read_documents", "split_by_document",
]
