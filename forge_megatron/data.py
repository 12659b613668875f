"""Training data for the CPU job: a real byte-level text corpus that ships with Python, or
Megatron's mock GPT token stream.

`stdlib` is the source of the Python standard library that comes with the interpreter running
this code (real text nobody on this team wrote), read as bytes: vocabulary = 256 byte values + an
end-of-document token. Files are assigned to train or validation by a hash of their path, so the
split is stable across machines with the same Python version. `mock` is megatron-core's
MockGPTLowLevelDataset (counting sequences ending in an end-of-document token).
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import numpy as np
import torch

BYTE_VOCAB = 257  # 256 byte values + end of document
EOD = 256
CORPORA = ("stdlib", "mock")


def stdlib_tokens(split: str, max_bytes: int = 8 << 20) -> np.ndarray:
    """Byte tokens of the standard library's .py files of one split ('train' or 'valid')."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts[-2:])
    chunks, total = [], 0
    for path in files:
        bucket = int(hashlib.sha256(str(path.relative_to(root)).encode()).hexdigest(), 16) % 10
        if (bucket == 0) != (split == "valid"):
            continue
        data = np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.int64)
        chunks.append(np.append(data, EOD))
        total += data.size + 1
        if total >= max_bytes:
            break
    return np.concatenate(chunks)


def mock_tokens(vocab_size: int, n_tokens: int) -> np.ndarray:
    """megatron-core's mock GPT documents, concatenated."""
    from megatron.core.datasets.gpt_dataset import MockGPTLowLevelDataset

    class _Tokenizer:
        eod = vocab_size - 1

    _Tokenizer.vocab_size = vocab_size
    documents = MockGPTLowLevelDataset(_Tokenizer())
    out, total, i = [], 0, 0
    while total < n_tokens:
        out.append(documents[i])
        total += out[-1].size
        i += 1
    return np.concatenate(out)[:n_tokens]


class TokenWindows(torch.utils.data.Dataset):
    """Non-overlapping windows of seq_length + 1 tokens, in the sample format of Megatron's GPT
    datasets (tokens, labels, loss_mask, position_ids), in a seeded random order."""

    def __init__(self, tokens: np.ndarray, seq_length: int, seed: int):
        self.tokens = torch.from_numpy(tokens)
        self.seq_length = seq_length
        n = (len(tokens) - 1) // seq_length
        if n < 1:
            raise ValueError(f"corpus of {len(tokens)} tokens is shorter than one sequence of {seq_length + 1}")
        self.order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = int(self.order[i % len(self.order)]) * self.seq_length
        window = self.tokens[start:start + self.seq_length + 1]
        return {"tokens": window[:-1], "labels": window[1:], "loss_mask": torch.ones(self.seq_length),
                "position_ids": torch.arange(self.seq_length)}


def batches(dataset: TokenWindows, micro_batch_size: int, start_sample: int = 0):
    """An endless iterator of micro-batches, resuming after `start_sample` samples."""
    i = start_sample
    while True:
        samples = [dataset[(i + k) % len(dataset)] for k in range(micro_batch_size)]
        i += micro_batch_size
        yield {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
