"""Hugging Face Llama-family checkpoints in and out of Megatron's GPT (the local spec FORGE covers).

config (config.json <-> Megatron flags, refusals), mapping (the weight layout, torch only),
te_layout (Transformer Engine spec names), files (safetensors directories), model (the GPT built
as forge-pretrain-gpt builds it), checkpoint (Megatron checkpoints read and written), importer,
exporter, relayout (TE-layout checkpoints to the local spec), dataset (HF-tokenized indexed
datasets), tiny (a tiny random Llama and its trained tokenizer), errors. Entry points:
forge-hf-import, forge-hf-export, forge-hf-dataset, forge-te-to-local (forge_megatron/cli/);
docs/finetune.md.
"""
