"""Build the mergekit parity fixtures: tests/fixtures/mergekit/ (inputs, recipes, mergekit's outputs).

Run with a Python that has mergekit 0.1.5 (never a fedmerge dependency)::

    python3 -m venv /tmp/mk && /tmp/mk/bin/pip install mergekit==0.1.5 torch==2.13.0
    /tmp/mk/bin/python tools/mergekit_fixtures.py            # writes tests/fixtures/mergekit/

1. Four tiny Llama models (hidden 32, 4 layers, vocab 128; fp32) from a config: ``base`` with seeded
   N(0, 0.02) weights (norms 1), and ``a``, ``b``, ``c`` = base + seeded noise of different scales
   and sparsity (so that trims, sign votes and quantiles have something to decide). Each gets a
   WordLevel tokenizer built offline from a few sentences (``save_pretrained``).
   Three more (``models/vocab/``: ``base``, ``chatml``, ``llama3``; 2 layers) each have their own
   tokenizer — other words at other ids, a chat format's added special tokens, ``chatml`` three embedding
   rows past its tokenizer — for the vocabulary surgery (``tokenizer_source``, the ``tokenizer:`` block);
   mergekit's output tokenizer is kept as ``expected/NAME.tokenizer.json``.
2. Every recipe of mergekit's ``examples/`` (arcee-ai/mergekit a6e4028) and recipes of the other methods, with
   the model names replaced by those models (base model → ``base``, the others in order → ``a``, ``b``,
   ``c``) and the 40-layer ranges scaled to 4 layers; nothing else changed.
3. ``mergekit-yaml`` on each recipe; its ``model.safetensors`` is stored as ``expected/NAME.safetensors``.

``tests/recipes/test_mergekit_parity.py`` runs ``fedmerge merge`` on the same recipes and models and
compares tensor by tensor. Deterministic: rerunning rewrites identical inputs (stochastic mergekit
methods — DARE, DELLA — are not among the recipes: their masks come from torch's global generator).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

HERE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "mergekit"
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a merge of models keeps what each one learned",
    "small models make fast tests",
]
LAYERS = 4

# mergekit's examples/ (0.1.5), model names as there; layer ranges of 40-layer models scaled to 4
EXAMPLES: dict[str, dict[str, Any]] = {
    "linear": {
        "models": [
            {"model": "psmathur/orca_mini_v3_13b", "parameters": {"weight": 1.0}},
            {"model": "WizardLM/WizardLM-13B-V1.2", "parameters": {"weight": 0.3}},
            {"model": "garage-bAInd/Platypus2-13B", "parameters": {"weight": 0.5}},
        ],
        "merge_method": "linear",
        "dtype": "float16",
    },
    "bio-merge": {
        "models": [
            {"model": "mistralai/Mistral-7B-Instruct-v0.2", "parameters": {"density": 0.5, "weight": 0.5}},
            {"model": "BioMistral/BioMistral-7B", "parameters": {"density": 0.5, "weight": 0.5}},
        ],
        "merge_method": "ties",
        "base_model": "mistralai/Mistral-7B-v0.1",
        "parameters": {"normalize": False, "int8_mask": True},
        "dtype": "float16",
    },
    "ties": {
        "models": [
            {"model": "psmathur/orca_mini_v3_13b", "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
            {
                "model": "garage-bAInd/Platypus2-13B",
                "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]},
            },
            {
                "model": "WizardLM/WizardMath-13B-V1.0",
                "parameters": {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]},
            },
        ],
        "merge_method": "ties",
        "base_model": "TheBloke/Llama-2-13B-fp16",
        "parameters": {"normalize": True, "int8_mask": True},
        "dtype": "float16",
    },
    "gradient-slerp": {
        "slices": [
            {
                "sources": [
                    {"model": "psmathur/orca_mini_v3_13b", "layer_range": [0, 40]},
                    {"model": "garage-bAInd/Platypus2-13B", "layer_range": [0, 40]},
                ]
            }
        ],
        "merge_method": "slerp",
        "base_model": "psmathur/orca_mini_v3_13b",
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                {"value": 0.5},
            ]
        },
        "dtype": "float16",
    },
    "orcamini-platy-44layer": {
        "slices": [
            {"sources": [{"model": "psmathur/orca_mini_v3_13b", "layer_range": [0, 24]}]},
            {"sources": [{"model": "garage-bAInd/Platypus2-13B", "layer_range": [20, 40]}]},
        ],
        "merge_method": "passthrough",
        "dtype": "float16",
    },
    "arcee_fusion": {
        "models": [{"model": "model_a"}, {"model": "model_b"}],
        "merge_method": "arcee_fusion",
        "base_model": "model_a",
        "dtype": "bfloat16",
    },
}

# recipes of the other methods mergekit 0.1.5 registers (docs/merge_methods.md's parameters)
METHOD_RECIPES: dict[str, dict[str, Any]] = {
    "nuslerp": {
        "models": [
            {"model": "m1", "parameters": {"weight": 0.3}},
            {"model": "m2", "parameters": {"weight": 0.7}},
        ],
        "merge_method": "nuslerp",
        "base_model": "base",
        "dtype": "float32",
    },
    "nuslerp-rows-no-base": {
        "models": [
            {"model": "m1", "parameters": {"weight": 1.0}},
            {"model": "m2", "parameters": {"weight": 2.0}},
        ],
        "merge_method": "nuslerp",
        "parameters": {"nuslerp_flatten": False},
        "dtype": "float32",
    },
    "nearswap": {
        "models": [{"model": "base"}, {"model": "m1"}],
        "merge_method": "nearswap",
        "base_model": "base",
        "parameters": {"t": 0.004},
        "dtype": "float32",
    },
    "sce": {
        "models": [{"model": "m1"}, {"model": "m2"}, {"model": "m3"}],
        "merge_method": "sce",
        "base_model": "base",
        "parameters": {"select_topk": 0.5},
        "dtype": "bfloat16",
    },
    "model_stock": {
        "models": [{"model": "m1"}, {"model": "m2"}, {"model": "m3"}],
        "merge_method": "model_stock",
        "base_model": "base",
        "dtype": "float32",
    },
    "ram": {
        "models": [{"model": "m1"}, {"model": "m2"}, {"model": "m3"}],
        "merge_method": "ram",
        "base_model": "base",
        "dtype": "float32",
    },
    "ramplus_tl": {
        "models": [{"model": "m1"}, {"model": "m2"}, {"model": "m3"}],
        "merge_method": "ramplus_tl",
        "base_model": "base",
        "parameters": {"r": 0.2, "alpha": 0.5},
        "dtype": "float32",
    },
    "task_arithmetic-gradient-filter": {
        "models": [
            {"model": "m1", "parameters": {"weight": [0.2, 1.0]}},
            {
                "model": "m2",
                "parameters": {"weight": [{"filter": "self_attn", "value": 0.9}, {"value": 0.1}]},
            },
        ],
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "parameters": {"lambda": [1.0, 0.5]},
        "dtype": "float32",
    },
    "ties-fp32-out-bf16": {
        "models": [
            {"model": "m1", "parameters": {"density": 0.6, "weight": 1.0}},
            {"model": "m2", "parameters": {"density": 0.3, "weight": 0.5}},
        ],
        "merge_method": "ties",
        "base_model": "base",
        "dtype": "float32",
        "out_dtype": "bfloat16",
    },
    "breadcrumbs_ties": {
        "models": [
            {"model": "m1", "parameters": {"density": 0.7, "gamma": 0.05, "weight": 1.0}},
            {"model": "m2", "parameters": {"density": 0.5, "gamma": 0.1, "weight": 1.0}},
        ],
        "merge_method": "breadcrumbs_ties",
        "base_model": "base",
        "dtype": "float32",
    },
    "linear-tokenizer-union": {
        "models": [
            {"model": "m1", "parameters": {"weight": 1.0}},
            {"model": "m2", "parameters": {"weight": 0.5}},
        ],
        "merge_method": "linear",
        "tokenizer_source": "union",
        "dtype": "bfloat16",
    },
    "task_arithmetic-tokenizer-model": {
        "models": [
            {"model": "m1", "parameters": {"weight": 0.7}},
            {"model": "m2", "parameters": {"weight": 0.4}},
        ],
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "tokenizer_source": "m2",
        "dtype": "float32",
    },
    # README's tokenizer: block (its token rules: a model's row, zero, another token's row; padding)
    "linear-tokenizer-block": {
        "models": [
            {"model": "m1", "parameters": {"weight": 1.0}},
            {"model": "m2", "parameters": {"weight": 0.5}},
        ],
        "merge_method": "linear",
        "tokenizer": {
            "source": "union",
            "tokens": {
                "fox": {"source": "m2", "force": True},
                "dog": {"source": {"kind": "zero"}, "force": True},
                "</s>": {"source": {"kind": "model_token", "model": "m1", "token": "<s>"}, "force": True},
                "the": {"source": "m1"},
            },
            "pad_to_multiple_of": 32,
        },
        "dtype": "bfloat16",
    },
    # one shared tokenizer, a block token it lacks: added to the vocabulary with its rule's row
    "linear-tokenizer-new-token": {
        "models": [
            {"model": "m1", "parameters": {"weight": 1.0}},
            {"model": "m2", "parameters": {"weight": 0.5}},
        ],
        "merge_method": "linear",
        "tokenizer": {
            "source": "union",
            "tokens": {"<|new|>": {"source": {"kind": "model_token", "model": "m2", "token": "fox"}}},
        },
        "dtype": "float32",
    },
    "task_arithmetic-tokenizer-block": {
        "models": [
            {"model": "m1", "parameters": {"weight": 0.7}},
            {"model": "m2", "parameters": {"weight": 0.4}},
        ],
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "tokenizer": {
            "source": "base",
            "tokens": {
                "quick": {"source": "base", "force": True},
                "lazy": {"source": {"kind": "model_token", "model": "m2", "token_id": 5}, "force": True},
            },
            "pad_to_multiple_of": 20,
        },
        "dtype": "float32",
    },
    # chat_template by name (written as chat_template.jinja, kept as expected/NAME.chat_template.jinja)
    "ties-chat-template": {
        "models": [
            {"model": "m1", "parameters": {"density": 0.5, "weight": 0.5}},
            {"model": "m2", "parameters": {"density": 0.5, "weight": 0.5}},
        ],
        "merge_method": "ties",
        "base_model": "base",
        "chat_template": "llama3",
        "dtype": "float32",
    },
    "slerp-slices": {
        "slices": [
            {"sources": [{"model": "base", "layer_range": [0, 2]}, {"model": "m1", "layer_range": [2, 4]}]},
            {"sources": [{"model": "base", "layer_range": [1, 4]}, {"model": "m1", "layer_range": [0, 3]}]},
        ],
        "merge_method": "slerp",
        "base_model": "base",
        "parameters": {"t": [0.1, 0.9]},
        "dtype": "float32",
    },
}

# docs/multimerge.md's example (mergekit-multi), its final dare_ties made ties (DARE's masks come from
# torch's global generator, so no two runs agree); the models in order → a, b (base), c, …
MULTI: dict[str, list[dict[str, Any]]] = {
    "multimerge": [
        {
            "name": "first-merge",
            "merge_method": "linear",
            "models": [{"model": "mistralai/Mistral-7B-v0.1"}, {"model": "BioMistral/BioMistral-7B"}],
            "parameters": {"weight": 0.5},
        },
        {
            "name": "second-merge",
            "merge_method": "slerp",
            "base_model": "first-merge",
            "models": [{"model": "NousResearch/Hermes-2-Pro-Mistral-7B"}],
            "parameters": {"t": 0.5},
        },
        {
            "merge_method": "ties",
            "base_model": "mistralai/Mistral-7B-v0.1",
            "models": [
                {"model": "second-merge", "parameters": {"density": 0.6, "weight": 0.5}},
                {"model": "teknium/OpenHermes-2.5-Mistral-7B", "parameters": {"density": 0.8, "weight": 0.5}},
            ],
        },
    ],
    # two stages over models with different tokenizers: the first stage's union vocabulary is the
    # second's input (a store version in fedmerge, a directory in mergekit-multi)
    "multimerge-union-vocab": [
        {
            "name": "first",
            "merge_method": "linear",
            "models": [
                {"model": "base", "parameters": {"weight": 1.0}},
                {"model": "chatml", "parameters": {"weight": 0.6}},
            ],
            "tokenizer_source": "union",
        },
        {
            "merge_method": "linear",
            "models": [
                {"model": "first", "parameters": {"weight": 1.0}},
                {"model": "llama3", "parameters": {"weight": 0.5}},
            ],
            "tokenizer_source": "union",
            "dtype": "bfloat16",
        },
    ],
}

# recipes over models with different tokenizers (``vocab/``: ``base`` and two fine-tunes whose tokenizers
# hold other words and a chat format's added tokens); model names are the directories' own
VOCAB_RECIPES: dict[str, dict[str, Any]] = {
    # README: tokenizer_source union over models with different vocabularies (base's rows, a donor's
    # rows, the average of the models that have a token)
    "task_arithmetic-union-vocab": {
        "models": [
            {"model": "chatml", "parameters": {"weight": 0.7}},
            {"model": "llama3", "parameters": {"weight": 0.4}},
        ],
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "tokenizer_source": "union",
        "dtype": "float32",
    },
    "linear-union-vocab": {
        "models": [
            {"model": "base", "parameters": {"weight": 0.5}},
            {"model": "chatml", "parameters": {"weight": 1.0}},
            {"model": "llama3", "parameters": {"weight": 0.5}},
        ],
        "merge_method": "linear",
        "tokenizer_source": "union",
        "dtype": "bfloat16",
    },
    # a model's tokenizer (not the base's): rows permuted to llama3's ids, tokens it lacks dropped
    "task_arithmetic-tokenizer-model-vocab": {
        "models": [
            {"model": "chatml", "parameters": {"weight": 0.7}},
            {"model": "llama3", "parameters": {"weight": 0.4}},
        ],
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "tokenizer_source": "llama3",
        "dtype": "float32",
    },
    # the base's tokenizer (tokens the base lacks are dropped; a block token the base lacks would be
    # added, but mergekit 0.1.5 then fails: add_tokens changes the base's own tokenizer object), padding
    "ties-tokenizer-base-vocab": {
        "models": [
            {"model": "chatml", "parameters": {"density": 0.5, "weight": 0.7}},
            {"model": "llama3", "parameters": {"density": 0.5, "weight": 0.4}},
        ],
        "merge_method": "ties",
        "base_model": "base",
        "tokenizer": {
            "source": "base",
            "tokens": {
                "fox": {"source": "chatml", "force": True},
                "models": {"source": "llama3"},
            },
            "pad_to_multiple_of": 8,
        },
        "dtype": "float32",
    },
    # slices over models with different tokenizers (the embeddings from the first slice's sources)
    "slerp-slices-union-vocab": {
        "slices": [
            {
                "sources": [
                    {"model": "base", "layer_range": [0, 1]},
                    {"model": "chatml", "layer_range": [1, 2]},
                ]
            },
            {
                "sources": [
                    {"model": "base", "layer_range": [1, 2]},
                    {"model": "llama3", "layer_range": [0, 1]},
                ]
            },
        ],
        "merge_method": "slerp",
        "base_model": "base",
        "parameters": {"t": [0.2, 0.7]},
        "tokenizer_source": "union",
        "dtype": "float32",
    },
    # README's tokenizer: block (chatml_model, llama3_model), plus a token no model has and padding
    "linear-tokenizer-block-vocab": {
        "models": [
            {"model": "base", "parameters": {"weight": 0.5}},
            {"model": "chatml", "parameters": {"weight": 1.0}},
            {"model": "llama3", "parameters": {"weight": 0.5}},
        ],
        "merge_method": "linear",
        "tokenizer": {
            "source": "union",
            "tokens": {
                "<|im_start|>": {"source": "chatml"},
                "<|im_end|>": {"source": "chatml"},
                "<|start_header_id|>": {"source": "llama3", "force": True},
                "<|end_header_id|>": {"source": "llama3", "force": True},
                "<|eot_id|>": {"source": "llama3", "force": True},
                "<|tool|>": {"source": {"kind": "model_token", "model": "chatml", "token": "<|im_end|>"}},
                "fox": {"source": {"kind": "zero"}, "force": True},
            },
            "pad_to_multiple_of": 16,
        },
        "dtype": "bfloat16",
    },
}
VOCAB_MODELS: dict[str, tuple[list[str], list[str], int]] = {
    # name: (sentences, added special tokens, extra embedding rows past the tokenizer)
    "base": (SENTENCES[:2], [], 0),
    "chatml": (
        [SENTENCES[0], "chat models answer in turns"],
        ["<|im_start|>", "<|im_end|>"],
        3,
    ),
    "llama3": (
        [SENTENCES[1], SENTENCES[2], "chat headers end each turn"],
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        0,
    ),
}

SCALED_RANGES = {0: 0, 20: 2, 24: 2, 40: 4}


def build_models(root: Path) -> None:
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, torch_dtype="float32",
    )  # fmt: skip
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    model = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    base = {
        k: (torch.ones_like(v) if v.dim() == 1 else 0.02 * torch.randn(v.shape, generator=g))
        for k, v in sorted(model.state_dict().items())
    }
    spec = {"base": (0.0, 1.0), "a": (0.01, 0.6), "b": (0.02, 0.4), "c": (0.015, 0.8)}
    for name, (scale, keep) in spec.items():
        g = torch.Generator().manual_seed(1 + list(spec).index(name))
        state = {
            k: v + scale * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < keep)
            for k, v in base.items()
        }
        model.load_state_dict(state)
        out = root / "models" / name
        model.save_pretrained(str(out))
        fast.save_pretrained(str(out))


def build_vocab_models(root: Path) -> None:
    """``vocab/base``, ``vocab/chatml``, ``vocab/llama3``: the same Llama shape but each its own WordLevel
    tokenizer (other words, other ids, added special tokens) and ``vocab_size`` (``chatml`` has three
    embedding rows past its tokenizer); ``chatml`` and ``llama3`` are base + noise on the shared words'
    rows, their own words' rows drawn fresh."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    toks = {}
    for name, (sentences, added, _) in VOCAB_MODELS.items():
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator(sentences, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
        fast = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
        )
        if added:
            fast.add_tokens(added, special_tokens=True)
        toks[name] = fast
    g = torch.Generator().manual_seed(10)
    shared = {}  # the base's non-vocabulary tensors and a row per word of every vocabulary
    words = sorted({w for t in toks.values() for w in t.get_vocab()})
    rows = {w: 0.02 * torch.randn(2, 32, generator=g) for w in words}  # (embedding, head) rows
    for name, (_, _, extra) in VOCAB_MODELS.items():
        fast = toks[name]
        vocab = fast.get_vocab()
        cfg = transformers.LlamaConfig(
            vocab_size=len(vocab) + extra, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=False, torch_dtype="float32",
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg)
        if not shared:
            shared = {
                k: (torch.ones_like(v) if v.dim() == 1 else 0.02 * torch.randn(v.shape, generator=g))
                for k, v in sorted(model.state_dict().items())
            }
        gm = torch.Generator().manual_seed(20 + list(VOCAB_MODELS).index(name))
        scale = 0.0 if name == "base" else 0.01
        state = {}
        for k, v in shared.items():
            if k in ("model.embed_tokens.weight", "lm_head.weight"):
                which = 0 if k.startswith("model.") else 1
                t = 0.02 * torch.randn(cfg.vocab_size, 32, generator=gm)  # rows past the tokenizer
                for w, i in vocab.items():
                    t[i] = rows[w][which]
                v = t
            state[k] = v + scale * torch.randn(v.shape, generator=gm)
        model.load_state_dict(state)
        out = root / "models" / "vocab" / name
        model.save_pretrained(str(out))
        fast.save_pretrained(str(out))


# conversations every named chat template of mergekit 0.1.5 is rendered with (transformers'
# apply_chat_template: its Jinja settings, bos/eos tokens); a format that refuses one records the refusal
CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Name a small model."}],
    [
        {"role": "system", "content": "You answer briefly. "},
        {"role": "user", "content": " What is a merge?"},
        {"role": "assistant", "content": "Weights combined into one model."},
        {"role": "user", "content": "And a task vector?\n"},
    ],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"}],
    [
        {"role": "system", "content": "Be exact."},
        {"role": "user_context", "content": "Two models, one tokenizer."},
        {"role": "user", "content": "Can they merge?"},
    ],
    [{"role": "assistant", "content": "I speak first."}, {"role": "user", "content": "Why?"}],
]
CHAT_TEMPLATE_NAMES = ("alpaca", "chatml", "exaone", "llama3", "mistral")


def render_chat_templates(root: Path) -> None:
    """``expected/chat_templates.json``: name → [(conversation, add_generation_prompt) → the rendered
    text, or ``"error: …"``] with mergekit's own template files (their text is not copied)."""
    import importlib.resources

    import transformers
    from mergekit._data import chat_templates

    tok = transformers.AutoTokenizer.from_pretrained(str(root / "models" / "a"))
    out: dict[str, list[str]] = {}
    for name in CHAT_TEMPLATE_NAMES:
        template = importlib.resources.files(chat_templates).joinpath(f"{name}.jinja").read_text()
        rendered = []
        for conv in CONVERSATIONS:
            for gen in (False, True):
                try:
                    text = tok.apply_chat_template(
                        conv, chat_template=template, tokenize=False, add_generation_prompt=gen
                    )
                    rendered.append(str(text))
                except Exception as exc:  # the format's own refusal (raise_exception)
                    rendered.append(f"error: {type(exc).__name__}")
        out[name] = rendered
    path = root / "expected" / "chat_templates.json"
    path.write_text(json.dumps({"conversations": CONVERSATIONS, "rendered": out}, indent=1) + "\n")


def rewrite(
    recipe: dict[str, Any],
    where: str,
    names: dict[str, str] | None = None,
    keep: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Model names → ``{where}/base`` (the base model) and ``{where}/a``, ``b``, ``c`` in order (``names``
    shared across the documents of a multi-document recipe; names in ``keep`` are left as they are)."""
    names = {} if names is None else names
    base = recipe.get("base_model")
    if base is not None and base not in keep and base not in names:
        names[base] = "base"

    def ref(n: str) -> str:
        if n in keep:
            return n
        if n not in names:
            names[n] = "abc"[len([v for v in names.values() if v != "base"])]
        return f"{where}/{names[n]}"

    out = json.loads(json.dumps(recipe))
    if out.get("tokenizer_source") not in (None, "base", "union"):
        out["tokenizer_source"] = ref(out["tokenizer_source"])
    if base is not None:
        out["base_model"] = ref(base)
    for m in out.get("models", []):
        m["model"] = ref(m["model"])
    for s in out.get("slices", []):
        for src in s["sources"]:
            src["model"] = ref(src["model"])
            if any(x in SCALED_RANGES and x > LAYERS for x in src["layer_range"]):
                src["layer_range"] = [SCALED_RANGES[x] for x in src["layer_range"]]
    block = out.get("tokenizer") or {}
    if block.get("source") not in (None, "base", "union"):
        block["source"] = ref(block["source"])
    for rule in (block.get("tokens") or {}).values():
        if isinstance(rule.get("source"), str):
            rule["source"] = ref(rule["source"])
        elif isinstance(rule.get("source"), dict) and "model" in rule["source"]:
            rule["source"]["model"] = ref(rule["source"]["model"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--mergekit-yaml", default=str(Path(sys.executable).parent / "mergekit-yaml"))
    ap.add_argument("--only", nargs="*", help="rerun only these recipes (models and the others kept)")
    args = ap.parse_args()
    root: Path = args.out
    if not args.only:
        for sub in ("models", "recipes", "expected"):
            shutil.rmtree(root / sub, ignore_errors=True)
            (root / sub).mkdir(parents=True)
        build_models(root)
        build_vocab_models(root)
    if args.only and not (root / "models" / "vocab").is_dir():
        build_vocab_models(root)
    for name, docs in MULTI.items():
        if args.only and name not in args.only:
            continue
        keep = frozenset(d["name"] for d in docs if "name" in d)
        first = {n: f"vocab/{n}" for n in VOCAB_MODELS} if name.endswith("-vocab") else {}
        shared: dict[str, str] = {"mistralai/Mistral-7B-v0.1": "base", **first}
        relative = [rewrite(d, "../models", shared, keep) for d in docs]
        (root / "recipes" / f"{name}.yml").write_text(yaml.safe_dump_all(relative, sort_keys=False))
        with tempfile.TemporaryDirectory() as tmp:
            shared = {"mistralai/Mistral-7B-v0.1": "base", **first}
            absolute = [rewrite(d, str((root / "models").resolve()), shared, keep) for d in docs]
            path = Path(tmp) / "recipe.yml"
            path.write_text(yaml.safe_dump_all(absolute, sort_keys=False))
            multi = str(Path(args.mergekit_yaml).parent / "mergekit-multi")
            subprocess.run([multi, str(path), "-I", f"{tmp}/mid", "--out-path", f"{tmp}/out"], check=True)
            files = sorted(Path(tmp, "out").glob("*.safetensors"))
            if len(files) != 1:
                raise SystemExit(f"{name}: expected one safetensors file, got {files}")
            shutil.copy(files[0], root / "expected" / f"{name}.safetensors")
            if name.endswith("-vocab"):
                shutil.copy(
                    Path(tmp) / "out" / "tokenizer.json", root / "expected" / f"{name}.tokenizer.json"
                )
        print(f"{name}: ok", flush=True)
    if not args.only or "chat_templates" in args.only:
        render_chat_templates(root)
        print("chat_templates: ok", flush=True)
    vocab_names = {n: f"vocab/{n}" for n in VOCAB_MODELS}
    for name, recipe in {**EXAMPLES, **METHOD_RECIPES, **VOCAB_RECIPES}.items():
        if args.only and name not in args.only:
            continue
        names = dict(vocab_names) if name in VOCAB_RECIPES else None
        relative = rewrite(recipe, "../models", None if names is None else dict(names))
        (root / "recipes" / f"{name}.yml").write_text(yaml.safe_dump(relative, sort_keys=False))
        with tempfile.TemporaryDirectory() as tmp:
            absolute = rewrite(recipe, str((root / "models").resolve()), names)
            path = Path(tmp) / "recipe.yml"
            path.write_text(yaml.safe_dump(absolute, sort_keys=False))
            subprocess.run([args.mergekit_yaml, str(path), f"{tmp}/out", "--no-lazy-unpickle"], check=True)
            files = sorted(Path(tmp, "out").glob("*.safetensors"))
            if len(files) != 1:
                raise SystemExit(f"{name}: expected one safetensors file, got {files}")
            shutil.copy(files[0], root / "expected" / f"{name}.safetensors")
            if name in VOCAB_RECIPES or name.endswith(
                "-new-token"
            ):  # the output vocabulary: part of the result
                shutil.copy(
                    Path(tmp) / "out" / "tokenizer.json", root / "expected" / f"{name}.tokenizer.json"
                )
            if (Path(tmp) / "out" / "chat_template.jinja").is_file():
                shutil.copy(
                    Path(tmp) / "out" / "chat_template.jinja",
                    root / "expected" / f"{name}.chat_template.jinja",
                )
        print(f"{name}: ok", flush=True)


if __name__ == "__main__":
    main()
