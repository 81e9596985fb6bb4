"""Make a small Hugging Face causal LM directory to federate, with nothing downloaded.

    python examples/hf_lora/make_model.py OUT_DIR corpus1.txt [corpus2.txt ...] [--dtype bfloat16]

A byte-level BPE tokenizer is trained on the given text with the ``tokenizers`` library and saved as
a ``PreTrainedTokenizerFast``; a 2-layer Llama (hidden 64) is built from its config with a fixed seed,
cast to ``--dtype`` (``float32`` by default; ``bfloat16`` and ``float16`` as most published checkpoints
are) and saved with ``save_pretrained`` (``config.json`` with that dtype, ``model.safetensors``,
``generation_config.json``, tokenizer files). Then ``fedmerge init --store STORE --base OUT_DIR``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_model(
    out: Path, corpora: list[Path], *, vocab_size: int = 512, seed: int = 0, dtype: str = "float32"
) -> Path:
    """Write the model directory ``out`` (module docstring) with weights in ``dtype``; return it."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
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
    torch.nn.Module.to(model, DTYPES[dtype])  # initialised in fp32, then cast in place
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Make a small Hugging Face causal LM directory to federate.")
    parser.add_argument("out", type=Path, help="model directory to write")
    parser.add_argument("corpora", type=Path, nargs="+", help="text files the tokenizer is trained on")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the saved weights"
    )
    args = parser.parse_args()
    print(make_model(args.out, args.corpora, dtype=args.dtype))
