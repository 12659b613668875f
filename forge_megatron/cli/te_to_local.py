"""forge-te-to-local: a Megatron checkpoint laid out for the Transformer Engine spec (norms inside
linear_qkv / linear_fc1) -> a release torch_dist checkpoint for FORGE's local spec.

    forge-te-to-local CKPT_DIR OUT_DIR [--hf-config-from HF_DIR] [--ckpt-step N] [--vocab-size V]

Needed for `--ckpt-format torch` checkpoints (TP=1); a torch_dist checkpoint of the TE spec
already loads into FORGE's spec as it is. The model's shape comes from the checkpoint's saved
arguments (or --hf-config-from). Writes OUT_DIR/release/ and OUT_DIR/model_flags.txt.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="forge-te-to-local", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt_dir", help="Megatron checkpoint directory")
    parser.add_argument("out_dir", help="checkpoint directory to write (for --load)")
    parser.add_argument("--hf-config-from", default=None, help="Hugging Face directory with the model's config.json")
    parser.add_argument("--ckpt-step", type=int, default=None, help="iteration to convert (default: the latest)")
    parser.add_argument("--vocab-size", type=int, default=None, help="unpadded vocabulary, if the args lack it")
    args = parser.parse_args(argv)
    # Imported here, not at the top: dist_checkpointing's spawned helper process re-imports this module.
    from forge_megatron.hf.errors import exit_on_conversion_error

    with exit_on_conversion_error("forge-te-to-local"):
        from forge_megatron.hf.config import read_config
        from forge_megatron.hf.relayout import to_local_release

        config = read_config(args.hf_config_from) if args.hf_config_from else None
        flags = to_local_release(args.ckpt_dir, args.out_dir, config, args.ckpt_step, args.vocab_size)
    print(f"wrote {args.out_dir}; train it with: forge-pretrain-gpt {' '.join(flags)} --load {args.out_dir} "
          "--finetune ...")


if __name__ == "__main__":
    main()
