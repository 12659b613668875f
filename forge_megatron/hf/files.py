"""A Hugging Face model directory on disk: safetensors weights (one file or an index of shards),
read lazily so that an 8B import holds one tensor at a time beside the model, written in shards
with the index transformers reads; and the files that travel with the weights (tokenizer,
generation config)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# What an exported directory copies from the source one, besides config.json.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


class SafetensorsWeights(Mapping):
    """name -> tensor of a Hugging Face directory's safetensors, each read when asked for."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        index = os.path.join(hf_dir, INDEX)
        if os.path.exists(index):
            with open(index) as f:
                files = {name: os.path.join(hf_dir, file) for name, file in json.load(f)["weight_map"].items()}
        elif os.path.exists(os.path.join(hf_dir, SINGLE)):
            single = os.path.join(hf_dir, SINGLE)
            with safe_open(single, "pt") as f:
                files = dict.fromkeys(f.keys(), single)
        else:
            raise FileNotFoundError(f"{hf_dir} has no {SINGLE} or {INDEX} (only safetensors weights are read; "
                                    "convert .bin weights with transformers' save_pretrained(safe_serialization=True))")
        self._files = files
        self._open = safe_open

    def __getitem__(self, name: str) -> torch.Tensor:
        with self._open(self._files[name], "pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def write_safetensors(out_dir: str, tensors: dict[str, torch.Tensor], max_shard_bytes: int = 5 << 30) -> list[str]:
    """Write `tensors` as model.safetensors, or as shards with an index past `max_shard_bytes`."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, SINGLE), metadata={"format": "pt"})
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(names, shards):
        save_file(shard, os.path.join(out_dir, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(out_dir, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


def copy_side_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copy the tokenizer and generation-config files that `src_dir` has into `dst_dir`."""
    copied = []
    for name in SIDE_FILES:
        if os.path.exists(os.path.join(src_dir, name)):
            shutil.copy(os.path.join(src_dir, name), os.path.join(dst_dir, name))
            copied.append(name)
    return copied
