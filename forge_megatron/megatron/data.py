"""The CPU job's training text as a Megatron indexed dataset: the Python standard library's own
source (real text nobody on this team wrote), byte-level.

Each .py file of the interpreter's standard library is one document of byte tokens (0-255)
ending in the end-of-document token 256 (or, with documents="paragraphs", each blank-line
separated block of a file up to 4 KiB long: many short documents of varying length, as in
supervised fine-tuning data, so that with --eod-mask-loss every micro-batch has its own token
count), so the vocabulary is 257 (`--tokenizer-type
NullTokenizer --vocab-size 257`, whose end-of-document id is 256). Documents are ordered by a hash
of their path, so Megatron's `--split` (contiguous document ranges) gives a random split that is
the same on every machine with the same Python version. Written once with megatron-core's
IndexedDatasetBuilder; Megatron's GPTDataset reads it through `--data-path PREFIX`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sysconfig
from pathlib import Path

import numpy as np

BYTE_VOCAB = 257  # 256 byte values + end of document
EOD = 256


def stdlib_files(max_bytes: int = 8 << 20) -> list[Path]:
    """The standard library's non-empty .py files (tests excluded), in hash order, up to about
    `max_bytes` bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts[-2:]]
    files.sort(key=lambda p: hashlib.sha256(str(p.relative_to(root)).encode()).hexdigest())
    chosen, total = [], 0
    for path in files:
        size = path.stat().st_size
        if size == 0:
            continue
        chosen.append(path)
        total += size + 1  # + EOD, as the byte documents count it
        if total >= max_bytes:
            break
    return chosen


DOCUMENTS = ("files", "paragraphs")
LONGEST_PARAGRAPH = 4096  # bytes: longer blocks (generated tables) are left out of the paragraph documents


def stdlib_documents(max_bytes: int = 8 << 20, documents: str = "files") -> list[np.ndarray]:
    """Byte tokens of stdlib_files(max_bytes): each file (or each of its blank-line separated
    paragraphs) ending in EOD."""
    if documents not in DOCUMENTS:
        raise ValueError(f"unknown document unit {documents!r}; choose one of {DOCUMENTS}")
    out = []
    for path in stdlib_files(max_bytes):
        text = path.read_bytes()
        pieces = [text] if documents == "files" else [p for p in text.split(b"\n\n") if 0 < len(p) <= LONGEST_PARAGRAPH]
        out += [np.append(np.frombuffer(piece, dtype=np.uint8).astype(np.uint16), np.uint16(EOD)) for piece in pieces]
    return out


def write_stdlib_dataset(prefix: str, max_bytes: int = 8 << 20, documents: str = "files") -> str:
    """Write `prefix`.bin/.idx (megatron-core's indexed dataset format) unless both exist;
    returns the prefix for --data-path."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    if os.path.exists(get_bin_path(prefix)) and os.path.exists(get_idx_path(prefix)):
        return prefix
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    partial = f"{prefix}.partial{os.getpid()}"  # concurrent writers each write their own, then replace
    builder = IndexedDatasetBuilder(get_bin_path(partial), dtype=np.uint16)
    for document in stdlib_documents(max_bytes, documents):
        builder.add_document(document, [document.size])
    builder.finalize(get_idx_path(partial))
    os.replace(get_bin_path(partial), get_bin_path(prefix))  # .idx last: its presence means complete
    os.replace(get_idx_path(partial), get_idx_path(prefix))
    return prefix


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="forge-stdlib-dataset", description=__doc__.split("\n\n")[0])
    parser.add_argument("prefix", help="output prefix: writes PREFIX.bin and PREFIX.idx (kept if present)")
    parser.add_argument("--max-bytes", type=int, default=8 << 20, help="about this many tokens (default 8 Mi)")
    parser.add_argument("--documents", default="files", choices=DOCUMENTS,
                        help="one document per file, or per blank-line separated paragraph (short documents of "
                             "varying length)")
    args = parser.parse_args(argv)
    print(write_stdlib_dataset(args.prefix, args.max_bytes, args.documents))


if __name__ == "__main__":
    main()
