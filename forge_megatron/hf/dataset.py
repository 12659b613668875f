"""Text tokenized with a Hugging Face tokenizer, as the Megatron indexed dataset that
forge-pretrain-gpt reads with `--data-path PREFIX --tokenizer-type HuggingFaceTokenizer
--tokenizer-model DIR`.

Each document is the tokenizer's encoding of one text (its own special tokens, e.g. Llama's BOS)
followed by its end-of-sequence token, the end-of-document id Megatron's HuggingFaceTokenizer
reports (its `eod`). Written with megatron-core's IndexedDatasetBuilder in the smallest dtype that
holds the vocabulary, as Megatron's preprocess_data.py does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

import numpy as np

from forge_megatron.hf.errors import ConversionError


def load_tokenizer(tokenizer_dir: str):
    """The Hugging Face tokenizer saved in `tokenizer_dir`, with an end-of-sequence token; a
    ConversionError saying how to get one otherwise (a model directory made from a config alone,
    e.g. a random model, has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0].strip().rstrip(":") if str(error).strip() else type(error).__name__
        raise ConversionError(f"--tokenizer-model {tokenizer_dir}: no usable Hugging Face tokenizer there ({reason}); "
                              "save the model's tokenizer into it (tokenizer.save_pretrained), or train one with the "
                              "tokenizers library as scripts/finetune_tiny_cpu.py does") from None
    if tokenizer.eos_token_id is None:
        raise ConversionError(f"--tokenizer-model {tokenizer_dir}: the tokenizer has no eos_token, and Megatron needs "
                              "an end-of-document id; set one (tokenizer.eos_token = ...) and save it again")
    return tokenizer


def tokenized_documents(tokenizer_dir: str, texts: Iterable[str]) -> Iterator[np.ndarray]:
    tokenizer = load_tokenizer(tokenizer_dir)
    eod = tokenizer.eos_token_id
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        if not ids or ids[-1] != eod:
            ids = [*ids, eod]
        yield np.asarray(ids, dtype=np.int64)


def write_hf_dataset(prefix: str, tokenizer_dir: str, texts: Iterable[str]) -> str:
    """Write PREFIX.bin/.idx, one document per text; returns the prefix for --data-path."""
    vocab = len(load_tokenizer(tokenizer_dir))
    return write_token_documents(prefix, tokenized_documents(tokenizer_dir, texts), vocab)


def write_token_documents(prefix: str, documents: Iterable[np.ndarray], vocab_size: int) -> str:
    """Write token-id documents as PREFIX.bin/.idx (the dtype fits `vocab_size`)."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path, get_idx_path

    dtype = DType.optimal_dtype(vocab_size)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    partial = f"{prefix}.partial"
    builder = IndexedDatasetBuilder(get_bin_path(partial), dtype=dtype)
    for document in documents:
        builder.add_document(np.asarray(document).astype(dtype), [len(document)])
    builder.finalize(get_idx_path(partial))
    os.replace(get_bin_path(partial), get_bin_path(prefix))  # .idx last: its presence means complete
    os.replace(get_idx_path(partial), get_idx_path(prefix))
    return prefix


def read_texts(paths: Iterable[str], json_key: str = "text") -> Iterator[str]:
    """Documents of text files (one per file) and JSON-lines files (.jsonl: one per line, its
    `json_key` field, as Megatron's preprocess_data.py reads them)."""
    for path in paths:
        if path.endswith(".jsonl"):
            with open(path) as f:
                for line in f:
                    if line.strip():
                        yield json.loads(line)[json_key]
        else:
            with open(path) as f:
                yield f.read()
