"""A tiny Hugging Face Llama to try the import, fine-tune and export on a CPU in seconds: random
weights from transformers, and a byte-level BPE tokenizer trained with the `tokenizers` library on
the text it will be fine-tuned on, saved beside the weights as transformers saves one (a model made
from a config alone has no tokenizer, and forge-hf-dataset needs one). Used by
scripts/finetune_tiny_cpu.py and tests/test_hf.py; needs transformers and tokenizers.
"""

from __future__ import annotations

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: pad, bos, eos
PAD_ID, BOS_ID, EOS_ID = range(3)


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str | None = None):
    """A byte-level BPE tokenizer of at most `vocab_size` ids trained on `texts` (every byte is
    in its alphabet, so any text encodes), as a transformers fast tokenizer; saved in `out_dir`
    (tokenizer.json, tokenizer_config.json) if given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    pad, bos, eos = SPECIAL_TOKENS
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=pad, bos_token=bos, eos_token=eos)
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast


def tiny_llama(out_dir: str, texts: list[str], vocab_size: int = 512, seed: int = 0, **shape):
    """A random LlamaForCausalLM (2 layers, hidden 64, 4 heads in 2 query groups, SwiGLU 176,
    untied embeddings; `shape` overrides LlamaConfig fields) and its tokenizer trained on `texts`,
    saved in `out_dir`; returns (model, tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(texts, vocab_size, out_dir)
    config = LlamaConfig(**{"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
                            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "vocab_size": vocab_size,
                            "pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, **shape})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out_dir)
    return model, tokenizer
