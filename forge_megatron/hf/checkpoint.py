"""Megatron checkpoint directories as the converters read and write them.

Written: a torch_dist checkpoint of the model alone (megatron-core's dist_checkpointing.save of the
model's sharded_state_dict, with the `args` and `checkpoint_version` Megatron's loader reads) in
`release/`, and latest_checkpointed_iteration.txt saying "release". torch_dist stores global
tensors with their sharding, so Megatron loads it at any tensor- and pipeline-parallel size that
divides the shapes; a release checkpoint is loaded like --finetune (no optimizer, RNG or iteration).

Read: torch_dist checkpoints of any tensor- and pipeline-parallel size (loaded into a TP=1 model
through its own sharded_state_dict, so SwiGLU's and qkv's sharding is undone by megatron-core
itself) and `--ckpt-format torch` checkpoints of TP=1 and PP=1, both in the local or the
Transformer Engine spec's layout (te_layout). Torch-format files are unpickled with
weights_only=True: tensors, containers and the classes megatron-core registers as safe
(argparse.Namespace, its enums and configs), never code; a file that needs anything else is
refused. (torch_dist's own metadata file is unpickled by torch.distributed.checkpoint itself.)
"""

from __future__ import annotations

import os
import pickle
import re

import torch

from forge_megatron.hf.errors import ConversionError
from forge_megatron.hf.te_layout import is_te_layout, te_to_local

TRACKER = "latest_checkpointed_iteration.txt"
TORCH_FILE = os.path.join("mp_rank_00", "model_optim_rng.pt")


def save_release(model, args, out_dir: str) -> str:
    """Write `model` as a release torch_dist checkpoint in `out_dir`; returns its path."""
    from megatron.core import dist_checkpointing

    path = os.path.join(out_dir, "release")
    os.makedirs(path, exist_ok=True)
    if os.listdir(path):
        raise ConversionError(f"{path} is not empty: choose a new output directory")
    state = {"model": model.sharded_state_dict(), "args": args, "checkpoint_version": 3.0, "iteration": 0}
    dist_checkpointing.save(state, path)
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(out_dir, TRACKER), "w") as f:
            f.write("release")
    return path


def resolve(ckpt_dir: str, iteration: int | None = None) -> str:
    """The directory of one checkpoint: `ckpt_dir` itself if it is one, else the iteration
    `iteration` or the tracker file names (the newest one, or "release")."""
    if _is_torch_dist(ckpt_dir) or os.path.exists(os.path.join(ckpt_dir, TORCH_FILE)):
        return ckpt_dir
    if iteration is None:
        tracker = os.path.join(ckpt_dir, TRACKER)
        if not os.path.exists(tracker):
            raise ConversionError(f"{ckpt_dir} is not a Megatron checkpoint directory (no {TRACKER})")
        with open(tracker) as f:
            text = f.read().strip()
        if text == "release":
            return os.path.join(ckpt_dir, "release")
        iteration = int(text)
    return os.path.join(ckpt_dir, f"iter_{iteration:07d}")


def _is_torch_dist(path: str) -> bool:
    from megatron.core import dist_checkpointing

    return os.path.isdir(path) and dist_checkpointing.check_is_distributed_checkpoint(path)


def load_torch_file(path: str):
    """A torch-format checkpoint file, unpickled with weights_only=True and megatron-core's safe
    globals (the saved args are an argparse.Namespace holding Megatron's enums); a file that needs
    other globals is refused in one line: unpickling them could run any code."""
    import megatron.core  # noqa: F401  (registers its safe globals with torch.serialization)

    try:
        with torch.serialization.safe_globals([bytes]):  # b"" pickled at protocol 2 is bytes() (TE's _extra_state)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        raise ConversionError(f"{path} is not read: unpickling it needs {found.group(1) if found else 'objects'}, "
                              "which torch.load(weights_only=True) refuses because it could run code; if you trust "
                              "the file, convert it with Megatron's --ckpt-convert-format torch_dist under "
                              "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1") from None


class Checkpoint:
    """One checkpoint directory: its format, saved Megatron arguments and model tensor shapes."""

    def __init__(self, path: str):
        from megatron.core import dist_checkpointing

        self.path = path
        self.torch_dist = _is_torch_dist(path)
        if self.torch_dist:
            self.args = dist_checkpointing.load_common_state_dict(path).get("args")
            self._metadata = dist_checkpointing.load_tensors_metadata(path)
            self.shapes = {k: tuple(v.global_shape) for k, v in self._metadata.items()}
            self.dtypes = {k: v.dtype for k, v in self._metadata.items()}
        else:
            if not os.path.exists(os.path.join(path, TORCH_FILE)):
                raise ConversionError(f"{path} is neither a torch_dist checkpoint nor a TP=1 torch-format one "
                                         f"({TORCH_FILE}); convert other layouts with Megatron's --ckpt-convert-format "
                                         "torch_dist")
            self._state = load_torch_file(os.path.join(path, TORCH_FILE))
            self.args = self._state.get("args")
            model = {k: v for k, v in self._state["model"].items() if isinstance(v, torch.Tensor)}
            self.shapes = {k: tuple(v.shape) for k, v in model.items()}
            self.dtypes = {k: v.dtype for k, v in model.items()}
        if self.args is not None and getattr(self.args, "pipeline_model_parallel_size", 1) > 1 \
                and not self.torch_dist:
            raise ConversionError("torch-format checkpoints with pipeline parallelism are not read: convert with "
                                     "Megatron's --ckpt-convert-format torch_dist")

    @property
    def padded_vocab(self) -> int:
        return self.shapes["embedding.word_embeddings.weight"][0]

    @property
    def dtype(self) -> torch.dtype:
        return self.dtypes["embedding.word_embeddings.weight"]

    @property
    def te_layout(self) -> bool:
        return is_te_layout(self.shapes)

    def load_into(self, model) -> None:
        """Fill a TP=1 (or any-TP, for torch_dist) local-spec model with this checkpoint's weights."""
        if self.torch_dist:
            from megatron.core import dist_checkpointing

            loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, self.path)
            model.load_state_dict(loaded["model"], strict=True)
            return
        state = te_to_local(self._state["model"])
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ConversionError(f"the checkpoint does not match the model: missing {missing[:4]}, "
                                     f"unexpected {unexpected[:4]}")
