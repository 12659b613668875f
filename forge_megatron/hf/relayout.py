"""A Megatron checkpoint in the Transformer Engine spec's layout (or any the exporter reads) ->
a release torch_dist checkpoint for FORGE's local spec, for `forge-pretrain-gpt --load OUT
--finetune`.

A torch_dist checkpoint of the TE spec needs no conversion (megatron-core writes the local spec's
norms under the TE names too, see te_layout); a `--ckpt-format torch` one does: its plain state
dict is renamed (te_layout.te_to_local) while the model is filled, then saved reshardable.
"""

from __future__ import annotations

from forge_megatron.hf.checkpoint import save_release
from forge_megatron.hf.config import megatron_flags
from forge_megatron.hf.exporter import load_megatron_model
from forge_megatron.hf.importer import write_flags


def to_local_release(ckpt_dir: str, out_dir: str, config: dict | None = None, iteration: int | None = None,
                     vocab_size: int | None = None) -> list[str]:
    """Write `ckpt_dir`'s model as a release checkpoint in `out_dir`; returns the model flags
    (also in out_dir/model_flags.txt)."""
    from megatron.training.global_vars import get_args

    config, model, ckpt = load_megatron_model(ckpt_dir, config, iteration, vocab_size)
    save_release(model, get_args(), out_dir)
    return write_flags(out_dir, [*megatron_flags(config, seq_length=1), "--padded-vocab-size", str(ckpt.padded_vocab)])
