"""Make a small Hugging Face causal LM directory to federate, with nothing downloaded.

    python examples/hf_lora/make_model.py OUT_DIR corpus1.txt [corpus2.txt ...]

A byte-level BPE tokenizer is trained on the given text with the ``tokenizers`` library and saved as
a ``PreTrainedTokenizerFast``; a 2-layer Llama (hidden 64) is built from its config with a fixed seed
and saved with ``save_pretrained`` (``config.json``, ``model.safetensors``, ``generation_config.json``,
tokenizer files). Then ``fedmerge init --store STORE --base OUT_DIR``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


def make_model(out: Path, corpora: list[Path], *, vocab_size: int = 512, seed: int = 0) -> Path:
    """Write the model directory ``out`` (see the module docstring) and return it."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train([str(p) for p in corpora], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")  # fmt: skip
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


if __name__ == "__main__":
    make_model(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
