"""forge-hf-dataset: text tokenized with a Hugging Face tokenizer, as a Megatron indexed dataset.

    forge-hf-dataset PREFIX --tokenizer-model DIR FILE [FILE ...]

Text files are one document each; .jsonl files one document per line (its "text" field, or
--json-key). DIR holds a tokenizer that transformers' AutoTokenizer loads, with an eos_token
(a model directory made from a config alone has none: see scripts/finetune_tiny_cpu.py for
training one). Train on it with --data-path PREFIX --tokenizer-type HuggingFaceTokenizer
--tokenizer-model DIR. Without one, or without an eos_token, it is one line and exit status 2.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="forge-hf-dataset", description=__doc__.split("\n\n")[0])
    parser.add_argument("prefix", help="output prefix: writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("files", nargs="+", help="text or .jsonl files")
    parser.add_argument("--tokenizer-model", required=True, help="Hugging Face tokenizer directory")
    parser.add_argument("--json-key", default="text", help="field of a .jsonl line (default: text)")
    args = parser.parse_args(argv)
    from forge_megatron.hf.dataset import read_texts, write_hf_dataset
    from forge_megatron.hf.errors import exit_on_conversion_error

    with exit_on_conversion_error("forge-hf-dataset"):
        print(write_hf_dataset(args.prefix, args.tokenizer_model, read_texts(args.files, args.json_key)))


if __name__ == "__main__":
    main()
