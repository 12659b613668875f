"""forge-hf-import: a Hugging Face Llama-family directory -> a Megatron torch_dist checkpoint that
`forge-pretrain-gpt --load OUT_DIR --finetune` starts from at any tensor-parallel size.

    forge-hf-import HF_DIR OUT_DIR [--tensor-model-parallel-size N] [--bf16] [other Megatron flags]

Builds the model at TP=1 on the CPU in this one process; --tensor-model-parallel-size only sets
the vocabulary padding (Megatron's, for that TP). Writes OUT_DIR/release/,
OUT_DIR/latest_checkpointed_iteration.txt and OUT_DIR/model_flags.txt (the model flags every run
on the checkpoint passes). A configuration that does not map is one line and exit status 2.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="forge-hf-import", description=__doc__.split("\n\n")[0],
                                     epilog="Other flags are Megatron's (e.g. --bf16, --make-vocab-size-divisible-by, "
                                            "--padded-vocab-size, --seq-length).")
    parser.add_argument("hf_dir", help="Hugging Face model directory (config.json + safetensors)")
    parser.add_argument("out_dir", help="checkpoint directory to write (for --load)")
    args, extra = parser.parse_known_args(argv)
    # Imported here, not at the top: dist_checkpointing's spawned helper process re-imports this module.
    from forge_megatron.hf.errors import exit_on_conversion_error

    with exit_on_conversion_error("forge-hf-import"):
        from forge_megatron.hf.importer import import_hf

        flags = import_hf(args.hf_dir, args.out_dir, extra)
    print(f"wrote {args.out_dir}; train it with: forge-pretrain-gpt {' '.join(flags)} --load {args.out_dir} "
          "--finetune ...")


if __name__ == "__main__":
    main()
