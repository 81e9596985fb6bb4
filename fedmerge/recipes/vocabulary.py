"""The vocabulary tensors of a merge (embeddings, LM head) under ``tokenizer_source`` or a
``tokenizer:`` block, as mergekit 0.1.5 builds them (``mergekit/tokenizer/embed.py``,
``PermutedVocabulary``) when every model shares one tokenizer.

With one shared tokenizer of V tokens, mergekit's permutation of each model's rows is the identity, so
for every model m and vocabulary tensor E_m (rows = config's ``vocab_size`` ≥ V):

1. E_m is cut to its first V rows (rows past the tokenizer are dropped);
2. each token t with a rule whose ``force`` is true gets one default row d_t in every model (the base
   included): ``zero`` → 0; a model M → E_M[t]; ``model_token`` M, u → E_M[u] (``u`` by id, or by the
   token's id in the shared vocabulary). A rule without ``force`` changes nothing here: every model has
   the token (mergekit uses a rule only for tokens some model lacks);
3. with ``pad_to_multiple_of`` P the rows are padded to V' = ⌈V/P⌉·P, each new row the mean of E_m's
   first V rows (after step 2), per model;

in the models' dtype (the recipe's ``dtype`` when it has one), before the merge method sees the
tensors. Different tokenizers need mergekit's vocabulary surgery (a union vocabulary and permuted
rows), which fedmerge refuses with a clear error rather than approximating.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedmerge.recipes.schema import Recipe, RecipeModelError, RecipeSchemaError, TokenizerBlock
from fedmerge.recipes.sources import Source

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
)


@dataclass(frozen=True)
class ForcedRow:
    """Token ``token_id``'s row in every model: zeros (``donor`` None) or ``donor``'s row ``row``."""

    token_id: int
    donor: str | None
    row: int


@dataclass(frozen=True)
class VocabularyRule:
    """How one vocabulary tensor is rebuilt (module docstring): cut to ``rows``, forced rows, padded to
    ``padded`` rows."""

    rows: int
    padded: int
    forced: tuple[ForcedRow, ...] = ()


def tokenizer_source_of(recipe: Recipe) -> str | None:
    """The recipe's tokenizer source: ``tokenizer_source``, or the ``tokenizer:`` block's ``source``."""
    return recipe.tokenizer.source if recipe.tokenizer is not None else recipe.tokenizer_source


def shared_vocabulary(recipe: Recipe, models: Sequence[Source]) -> dict[str, int] | None:
    """The one tokenizer every model has, as token → id (``None`` when the models have no
    ``tokenizer.json``). Raises when the source names no model of the recipe or the tokenizers differ."""
    tok = tokenizer_source_of(recipe)
    raws = {s.ref.raw for s in models}
    if tok not in ("base", "union") and tok not in raws:
        raise RecipeSchemaError(
            f"tokenizer source {tok!r} is not 'base', 'union' or one of the recipe's models ({sorted(raws)})"
        )
    signatures: dict[str, tuple[tuple[str, bytes], ...]] = {}
    for src in models:
        if src.ref.raw not in signatures:  # a model in several slices is read once
            files = src.files()
            signatures[src.ref.raw] = tuple((n, files[n]) for n in TOKENIZER_FILES if n in files)
    first_raw, first = next(iter(signatures.items()))
    for raw, sig in signatures.items():
        if sig != first:
            raise RecipeModelError(
                f"tokenizer source {tok!r}: models {first_raw!r} and {raw!r} have different tokenizers; "
                "fedmerge does not rebuild the vocabulary and permute token embeddings (mergekit's tokenizer "
                "surgery) — merge models that share a tokenizer, or omit the tokenizer source"
            )
    raw_tok = dict(first).get("tokenizer.json")  # every model's, as the signatures are equal
    if raw_tok is None:
        return None
    data = json.loads(raw_tok)
    vocab = data.get("model", {}).get("vocab", {})
    ids = dict(vocab) if isinstance(vocab, dict) else {str(e[0]): i for i, e in enumerate(vocab)}
    ids.update({a["content"]: a["id"] for a in data.get("added_tokens", [])})
    return ids


def vocabulary_rule(
    block: TokenizerBlock | None, vocab: Mapping[str, int], rows: int, sources: Mapping[str, Source]
) -> tuple[VocabularyRule, list[str]]:
    """The rule for the vocabulary tensors (``rows`` rows in the models) and notes for the record."""
    n_vocab = max(vocab.values()) + 1 if vocab else 0
    if n_vocab > rows:
        raise RecipeModelError(
            f"the tokenizer has {n_vocab} tokens but the model {rows} embedding rows; new rows need "
            "mergekit's vocabulary surgery, which fedmerge does not implement"
        )
    notes: list[str] = []
    forced: list[ForcedRow] = []
    for token, rule in (block.tokens if block is not None else {}).items():
        if token not in vocab:
            notes.append(f"tokenizer.tokens[{token!r}]: not in the vocabulary, ignored (as mergekit)")
            continue
        if not rule.force:
            notes.append(f"tokenizer.tokens[{token!r}]: every model has it and force is false: unchanged")
            continue
        if rule.kind == "none":
            raise RecipeSchemaError(f"tokenizer.tokens[{token!r}]: force needs a source (a model, zero, …)")
        if rule.kind == "zero":
            forced.append(ForcedRow(vocab[token], None, 0))
            continue
        assert rule.model is not None
        if rule.model not in sources:
            raise RecipeSchemaError(
                f"tokenizer.tokens[{token!r}].source names {rule.model!r}, not one of the recipe's models "
                f"({sorted(sources)})"
            )
        row = vocab[token]
        if rule.kind == "model_token":
            if rule.token is not None and rule.token not in vocab:
                raise RecipeSchemaError(
                    f"tokenizer.tokens[{token!r}].source.token {rule.token!r} is not in "
                    f"{rule.model!r}'s vocabulary"
                )
            row = rule.token_id if rule.token_id is not None else vocab[str(rule.token)]
            if row >= rows:
                raise RecipeSchemaError(
                    f"tokenizer.tokens[{token!r}].source.token_id {row} is out of range for {rule.model!r} "
                    f"({rows} rows)"
                )
        forced.append(ForcedRow(vocab[token], rule.model, row))
    pad = block.pad_to_multiple_of if block is not None else None
    padded = -(-n_vocab // pad) * pad if pad else n_vocab
    return VocabularyRule(n_vocab, padded, tuple(forced)), notes


def rebuild(
    x: torch.Tensor, rule: VocabularyRule, defaults: Mapping[int, torch.Tensor | None]
) -> torch.Tensor:
    """Steps 1–3 of the module docstring on one model's vocabulary tensor ``x`` (rows first);
    ``defaults`` maps each forced token to its row (None: zeros)."""
    if rule.padded == rule.rows and not defaults:
        return x[: rule.rows]  # only cut: a view, no copy
    out = torch.zeros((rule.padded, *x.shape[1:]), dtype=x.dtype)
    out[: rule.rows] = x[: rule.rows]
    for token_id, row in defaults.items():
        out[token_id] = 0 if row is None else row.to(x.dtype)
    if rule.padded > rule.rows:
        out[rule.rows :] = torch.mean(out[: rule.rows], dim=0)
    return out
