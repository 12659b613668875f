"""forge-hf-export: a Megatron checkpoint (forge-pretrain-gpt's torch_dist at any TP and PP, or a
TP=1, PP=1 torch-format one; local or Transformer Engine layout) -> a Hugging Face directory.

    forge-hf-export CKPT_DIR HF_OUT [--hf-config-from HF_DIR] [--ckpt-step N] [--dtype bfloat16]

CKPT_DIR is a --save directory (its latest iteration, or --ckpt-step) or one iteration's folder.
With --hf-config-from the source config.json is used and its tokenizer files are copied; without
it, the config is made from the Megatron arguments saved in the checkpoint.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    from forge_megatron.hf.exporter import DTYPES

    parser = argparse.ArgumentParser(prog="forge-hf-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt_dir", help="Megatron checkpoint directory")
    parser.add_argument("out_dir", help="Hugging Face directory to write")
    parser.add_argument("--hf-config-from", default=None, help="Hugging Face directory the model came from")
    parser.add_argument("--ckpt-step", type=int, default=None, help="iteration to export (default: the latest)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="weights' dtype (default: the checkpoint's)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="unpadded vocabulary, without --hf-config-from when the checkpoint's args lack it")
    args = parser.parse_args(argv)
    # Imported here, not at the top: dist_checkpointing's spawned helper process re-imports this module.
    from forge_megatron.hf.errors import exit_on_conversion_error

    with exit_on_conversion_error("forge-hf-export"):
        from forge_megatron.hf.exporter import export_hf

        export_hf(args.ckpt_dir, args.out_dir, args.hf_config_from, args.ckpt_step, args.dtype, args.vocab_size)
    print(f"wrote {args.out_dir}")


if __name__ == "__main__":
    main()
