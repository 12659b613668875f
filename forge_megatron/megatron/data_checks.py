"""The data flags, checked before Megatron starts: every dataset exists, and every part of
--split that Megatron builds gets at least one of its documents.

An empty part is not an error in Megatron: GPTDataset counts the epochs it needs with
`while num_tokens < num_tokens_requested: num_tokens += num_tokens_per_epoch`
(megatron/core/datasets/gpt_dataset.py, _get_num_epochs), which never ends when the part holds no
token; and every nonzero part of --split is built, whatever --eval-iters says (a part asked for
0 samples still needs 1 token). The run then hangs after "Build and save the GPTDataset valid
indices". Here it is one line instead, naming the fix. Parts and document ranges are computed as
megatron-core computes them (its split parsing and rounding).
"""

from __future__ import annotations

from forge_megatron.megatron.errors import ConfigurationError

PARTS = ("training", "validation", "test")
PER_SPLIT_FLAGS = ("--train-data-path", "--valid-data-path", "--test-data-path")


def check_data(args) -> None:
    """Refuse (ConfigurationError) a missing dataset or a --split part that holds no document."""
    if getattr(args, "mock_data", False):
        return
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    if blend is not None:
        split = convert_split_vector_to_split_matrix(parse_and_normalize_split(args.split))
        for prefix in blend[0]:
            documents = _documents(prefix, "--data-path")
            for part, bounds in zip(PARTS, split if documents is not None else ()):
                if bounds is not None and int(round(bounds[0] * documents)) == int(round(bounds[1] * documents)):
                    raise ConfigurationError(
                        f"--split {args.split} leaves the {part} part of {prefix} ({documents} documents) empty, "
                        "on which Megatron's dataset index never finishes building: use a corpus of more documents, "
                        "a --split that gives every nonzero part a document (a zero part is not built, e.g. "
                        "--split 100,0,0 with --eval-iters 0), or --train-data-path / --valid-data-path")
    for flag, part_blend in zip(PER_SPLIT_FLAGS, blend_per_split or ()):
        for prefix in part_blend[0] if part_blend else ():
            if _documents(prefix, flag) == 0:
                raise ConfigurationError(f"{flag} {prefix} holds no document, on which Megatron's dataset index "
                                         "never finishes building: write the dataset from some text")


def _documents(prefix: str, flag: str) -> int | None:
    """The number of documents (GPTDataset's sequences) of the indexed dataset at `prefix`;
    None for object-storage paths (not checked)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.object_storage_utils import is_object_storage_path

    if is_object_storage_path(prefix):
        return None
    if not IndexedDataset.exists(prefix):
        raise ConfigurationError(f"{flag} {prefix}: no {prefix}.idx and {prefix}.bin; write them with "
                                 "forge-hf-dataset (a Hugging Face tokenizer), forge-stdlib-dataset or Megatron's "
                                 "preprocess_data.py")
    return int(IndexedDataset(prefix, mmap=False).sequence_lengths.shape[0])  # the .idx only: no .bin mmap
