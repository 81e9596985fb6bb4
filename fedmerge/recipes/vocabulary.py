"""The vocabulary of a merge (``tokenizer_source`` or a ``tokenizer:`` block) and its tensors (embeddings,
LM head), as mergekit 0.1.5 builds them (``mergekit/tokenizer/build.py``, ``build_tokenizer``, and
``embed.py``, ``PermutedVocabulary``), for models with the same or with different tokenizers.

**Output vocabulary** V (token → id), from each model's ``tokenizer.json`` (its vocabulary and added
tokens, ids below its config's ``vocab_size``); the tokenizer base is ``base_model``, else the first
model listed:

* ``base``: the base's tokenizer; a model: that model's tokenizer;
* ``union``: the base's tokenizer, then every other token of every model (base first, then the models in
  recipe order, each by id) appended as a new added token (``normalized``, not special), then every
  model's added tokens (their own settings, the first model's when several have one);
* then every token named in ``tokenizer.tokens`` that V lacks is appended (as mergekit's ``add_tokens``).

**Permutation**: p_m(t) = model m's id of token t, or −1 when m lacks it.

**Rows** (per vocabulary tensor E_m, rows first; the merged models M = every model whose tensor enters
the merge, base included): a token t gets a default row d_t when its rule has ``force`` or some model of
M lacks it; the rule is the recipe's ``tokens[t]`` if given, else: only one model has t → that model's
row; no model has t → zero; the base is in M and has t → the base's row; otherwise the average of the
rows of the models that have t, Σ E_m[p_m(t)] / count, summed in M's order in the tensors' dtype. A
rule's source is ``zero``, a model m (E_m[p_m(t)], m must have t) or ``model_token`` m, u (E_m[u], u by
id in m's rows or by token in m's vocabulary). Model m's rebuilt tensor: row t = E_m[p_m(t)] when m has
t and t is not forced, else d_t. With ``pad_to_multiple_of`` P the rows are padded to ⌈|V|/P⌉·P, each
new row the mean of the first |V| rows, per model. All in the models' dtype (the recipe's ``dtype`` when
it has one), before the merge method sees the tensors.

With one shared tokenizer and no added token every permutation is the identity and only forced rows and
padding change anything.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from fedmerge.recipes.schema import HF_CONFIG, Recipe, RecipeModelError, RecipeSchemaError, TokenRule
from fedmerge.recipes.sources import Source

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
)


@dataclass(frozen=True)
class DefaultRow:
    """Token ``token_id``'s default row: ``zero``, one model's row (``donor``: ``rows`` has one entry) or
    the ``average`` of ``rows``; each entry is (model, row in that model's own tensor)."""

    token_id: int
    kind: Literal["zero", "donor", "average"]
    rows: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class VocabularyRule:
    """How each model's vocabulary tensor is rebuilt (module docstring): ``rows`` = |V| rows, old row
    per new id per model (``perms``: −1 where the model lacks the token), forced token ids, defaults, and
    ``padded`` rows in all."""

    rows: int
    padded: int
    perms: dict[str, tuple[int, ...]] = field(default_factory=dict)
    forced: frozenset[int] = frozenset()
    defaults: tuple[DefaultRow, ...] = ()
    models: tuple[str, ...] = ()  # M, in the order the average sums them

    @property
    def identity(self) -> bool:
        """Every model's tensor is only cut to its first ``rows`` rows."""
        ident = tuple(range(self.rows))
        return self.padded == self.rows and not self.defaults and all(p == ident for p in self.perms.values())


@dataclass
class Vocabulary:
    """The output vocabulary and what the export needs: each model's token → id, the output's
    tokenizer files (None: the tokenizer base's files unchanged)."""

    ids: dict[str, int]
    model_ids: dict[str, dict[str, int]]
    model_rows: dict[str, int]  # each model's config vocab_size (its vocabulary tensors' rows)
    files: dict[str, bytes] | None
    source: str  # the model whose tokenizer files are the output's
    notes: list[str] = field(default_factory=list)


def tokenizer_source_of(recipe: Recipe) -> str | None:
    """The recipe's tokenizer source: ``tokenizer_source``, or the ``tokenizer:`` block's ``source``."""
    return recipe.tokenizer.source if recipe.tokenizer is not None else recipe.tokenizer_source


def _tokenizer(raw: str, files: Mapping[str, bytes]) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """A model's vocabulary (token → id, added tokens included) and added tokens, from tokenizer.json."""
    data = json.loads(files["tokenizer.json"])
    vocab = data.get("model", {}).get("vocab", {})
    ids = dict(vocab) if isinstance(vocab, dict) else {str(e[0]): i for i, e in enumerate(vocab)}
    added = [a for a in data.get("added_tokens", []) if isinstance(a, dict) and "content" in a]
    ids.update({a["content"]: a["id"] for a in added})
    return ids, added


def config_rows(files: Mapping[str, bytes]) -> int | None:
    """A model's config ``vocab_size`` (the rows of its embeddings and LM head), None if it has none."""
    config = files.get(HF_CONFIG)
    try:
        rows = json.loads(config).get("vocab_size") if config else None
    except (ValueError, AttributeError):
        return None
    return rows if isinstance(rows, int) else None


def model_rows(raw: str, files: Mapping[str, bytes]) -> int:
    """:func:`config_rows`, required."""
    rows = config_rows(files)
    if rows is None:
        raise RecipeModelError(
            f"a tokenizer source needs {raw!r}'s config.json vocab_size to find its embeddings"
        )
    return rows


def build_vocabulary(recipe: Recipe, models: Sequence[Source], base: Source | None) -> Vocabulary | None:
    """The output vocabulary (module docstring) of ``models`` (recipe order, once each); ``base`` the
    recipe's base model. None when no model has a ``tokenizer.json`` (then nothing is rebuilt)."""
    tok = tokenizer_source_of(recipe)
    ordered = {s.ref.raw: s for s in ([base] if base is not None else []) + list(models)}
    if tok not in ("base", "union") and tok not in ordered:
        raise RecipeSchemaError(
            f"tokenizer source {tok!r} is not 'base', 'union' or one of the recipe's models "
            f"({sorted(ordered)})"
        )
    files = {raw: s.files() for raw, s in ordered.items()}
    sigs = {raw: tuple((n, f[n]) for n in TOKENIZER_FILES if n in f) for raw, f in files.items()}
    without = [raw for raw, f in files.items() if "tokenizer.json" not in f]
    if len(without) == len(files):
        return None
    if without and len(set(sigs.values())) > 1:
        raise RecipeModelError(
            f"tokenizer source {tok!r}: model {without[0]!r} has no tokenizer.json and the models' "
            "tokenizers differ; the vocabulary surgery needs every model's tokenizer.json"
        )
    first = next(iter(ordered))  # the tokenizer base: base_model, else the first model listed
    out_raw = first if tok in ("base", "union") else str(tok)
    rows = {raw: model_rows(raw, f) for raw, f in files.items()}
    model_ids: dict[str, dict[str, int]] = {}
    added: dict[str, list[dict[str, Any]]] = {}
    for raw, f in files.items():
        ids, add = _tokenizer(raw, f)
        past = sorted((i, t) for t, i in ids.items() if i >= rows[raw])
        if past:
            raise RecipeModelError(
                f"model {raw!r}: its tokenizer has token {past[0][1]!r} at id {past[0][0]} but its "
                f"embeddings have {rows[raw]} rows; strip the tokenizer to the model's vocab_size first"
            )
        model_ids[raw], added[raw] = ids, add
    ids = dict(model_ids[out_raw])
    new_plain: list[str] = []
    new_added: list[dict[str, Any]] = []
    if tok == "union":
        added_names = {a["content"] for adds in added.values() for a in adds}
        seen_added: set[str] = set()
        seen_plain: set[str] = set()
        for raw in files:
            own_added = {a["content"] for a in added[raw]}
            for t, _ in sorted(model_ids[raw].items(), key=lambda kv: kv[1]):
                if t not in own_added and t not in ids and t not in added_names and t not in seen_plain:
                    seen_plain.add(t)
                    new_plain.append(t)
            for a in sorted(added[raw], key=lambda a: int(a["id"])):
                if a["content"] not in seen_added:
                    seen_added.add(a["content"])
                    if a["content"] not in ids:
                        new_added.append(a)
    block_tokens = list(recipe.tokenizer.tokens) if recipe.tokenizer is not None else []
    taken = set(ids) | set(new_plain) | {a["content"] for a in new_added}
    extra = [t for t in dict.fromkeys(block_tokens) if t not in taken]
    for t in new_plain:  # the union's plain tokens, then its added tokens, then the block's
        ids[t] = len(ids)
    for a in new_added:
        ids[a["content"]] = len(ids)
    for t in extra:
        ids[t] = len(ids)
    out_files: dict[str, bytes] | None = None
    if new_plain or new_added or extra:
        out_files = _tokenizer_files(files[out_raw], new_plain, new_added, extra, ids)
    elif len(set(sigs.values())) > 1:  # the tokenizer source's own files, whichever model is the anchor
        out_files = {n: b for n, b in files[out_raw].items() if n in TOKENIZER_FILES}
    notes = []
    if len(set(sigs.values())) > 1:
        notes.append(
            f"tokenizer source {tok!r}: the models' tokenizers differ; vocabulary of {len(ids)} tokens "
            f"({len(new_plain) + len(new_added) + len(extra)} added to {out_raw!r}'s), embedding rows "
            "permuted per model (as mergekit)"
        )
    return Vocabulary(ids, model_ids, rows, out_files, out_raw, notes)


def _tokenizer_files(
    files: Mapping[str, bytes],
    plain: Sequence[str],
    added: Sequence[Mapping[str, Any]],
    extra: Sequence[str],
    ids: Mapping[str, int],
) -> dict[str, bytes]:
    """The tokenizer base's files with the new tokens added (``tokenizers``' ``add_tokens``: ids appended
    in order, as ``transformers``' ``add_tokens`` does in mergekit)."""
    try:
        from tokenizers import AddedToken, Tokenizer
    except ImportError:  # pragma: no cover - transformers (fedmerge[lora]) brings it
        raise RecipeModelError(
            "a vocabulary with new tokens needs the 'tokenizers' package (pip install 'fedmerge[lora]')"
        ) from None
    tk = Tokenizer.from_str(files["tokenizer.json"].decode())
    keys = ("single_word", "lstrip", "rstrip", "normalized", "special")
    tk.add_tokens(  # one call: ids in list order (one call per token rebuilds the matcher each time)
        [AddedToken(t, normalized=True, special=False) for t in plain]
        + [AddedToken(a["content"], **{k: bool(a[k]) for k in keys if k in a}) for a in added]
        + [AddedToken(t, normalized=True, special=False) for t in extra]
    )
    got = tk.get_vocab(with_added_tokens=True)
    if got != dict(ids):  # the library numbered a token otherwise than the plan: refuse, never guess
        wrong = sorted(t for t in ids if got.get(t) != ids[t])
        raise RecipeModelError(f"the output tokenizer numbers {wrong[:3]} otherwise than the vocabulary plan")
    out = {n: b for n, b in files.items() if n in TOKENIZER_FILES}
    out["tokenizer.json"] = tk.to_str(pretty=True).encode()
    return out


def vocabulary_rule(
    recipe: Recipe, vocab: Vocabulary, models: Sequence[str], base: str | None
) -> tuple[VocabularyRule, list[str]]:
    """The rule for the vocabulary tensors of the merged models ``models`` (M, in mergekit's order: the
    recipe's models, the base last when not listed) and notes for the record."""
    block = recipe.tokenizer
    rules: dict[str, TokenRule] = dict(block.tokens) if block is not None else {}
    n = len(vocab.ids)
    if sorted(vocab.ids.values()) != list(range(n)):
        raise RecipeModelError("the output tokenizer's ids are not 0 … n−1; fedmerge cannot lay out its rows")
    perms = {
        m: tuple(vocab.model_ids[m].get(t, -1) for t, _ in sorted(vocab.ids.items(), key=lambda kv: kv[1]))
        for m in models
    }
    notes: list[str] = []
    forced = frozenset(vocab.ids[t] for t, r in rules.items() if r.force and t in vocab.ids)
    defaults: list[DefaultRow] = []
    for token, tid in sorted(vocab.ids.items(), key=lambda kv: kv[1]):
        have = [m for m in models if perms[m][tid] >= 0]
        rule = rules.get(token)
        if not (rule is not None and rule.force) and len(have) == len(models):
            if rule is not None:
                notes.append(f"tokenizer.tokens[{token!r}]: every model has it and force is false: unchanged")
            continue
        if rule is None:
            if len(have) == 1:
                defaults.append(DefaultRow(tid, "donor", ((have[0], perms[have[0]][tid]),)))
            elif not have:
                defaults.append(DefaultRow(tid, "zero"))
            elif base is not None and base in have:
                defaults.append(DefaultRow(tid, "donor", ((base, perms[base][tid]),)))
            else:
                defaults.append(DefaultRow(tid, "average", tuple((m, perms[m][tid]) for m in have)))
            continue
        defaults.append(_rule_row(token, tid, rule, vocab, perms))
    pad = block.pad_to_multiple_of if block is not None else None
    padded = -(-n // pad) * pad if pad else n
    return VocabularyRule(n, padded, perms, forced, tuple(defaults), tuple(models)), notes


def _rule_row(
    token: str, tid: int, rule: TokenRule, vocab: Vocabulary, perms: Mapping[str, tuple[int, ...]]
) -> DefaultRow:
    """A ``tokens`` rule's default row for token ``token`` (id ``tid``)."""
    where = f"tokenizer.tokens[{token!r}]"
    if rule.kind == "none":
        raise RecipeSchemaError(
            f"{where}: the token needs a source (a model, zero, …): force is set or a model lacks it"
        )
    if rule.kind == "zero":
        return DefaultRow(tid, "zero")
    m = rule.model
    if m is None or m not in vocab.model_ids:
        raise RecipeSchemaError(
            f"{where}.source names {m!r}, not one of the recipe's models ({sorted(vocab.model_ids)})"
        )
    if rule.kind == "model_token":
        if rule.token_id is not None:
            row = rule.token_id
        elif rule.token in vocab.model_ids[m]:
            row = vocab.model_ids[m][str(rule.token)]
        else:
            raise RecipeSchemaError(f"{where}.source.token {rule.token!r} is not in {m!r}'s vocabulary")
        if not 0 <= row < vocab.model_rows[m]:
            raise RecipeSchemaError(
                f"{where}.source.token_id {row} is out of range for {m!r} ({vocab.model_rows[m]} rows)"
            )
        return DefaultRow(tid, "donor", ((m, row),))
    row = vocab.model_ids[m].get(token, -1)
    if row < 0:
        raise RecipeSchemaError(f"{where}.source: model {m!r} does not have the token; name one that has it")
    return DefaultRow(tid, "donor", ((m, row),))


@dataclass(frozen=True)
class DefaultRows:
    """The default rows of a vocabulary tensor: token ids and their rows (zeros for ``zero``), stacked."""

    ids: torch.Tensor  # (k,) long
    rows: torch.Tensor  # (k, *row shape), the tensors' dtype


def default_rows(
    rule: VocabularyRule, tensors: Mapping[str, torch.Tensor], shape: Sequence[int], dtype: torch.dtype
) -> DefaultRows:
    """Each default row d_t (``shape``, ``dtype``: a row of the tensors as read, in the recipe's dtype)
    from the models' vocabulary tensors ``tensors`` (those the rows need): a donor's row gathered,
    zeros, or an average summed in M's order and divided, in that dtype, as mergekit."""
    k = len(rule.defaults)
    rows = torch.zeros((k, *shape), dtype=dtype)
    donors: dict[str, tuple[list[int], list[int]]] = {}
    for j, d in enumerate(rule.defaults):
        if d.kind == "donor":
            ((m, row),) = d.rows
            slots, src = donors.setdefault(m, ([], []))
            slots.append(j)
            src.append(row)
        elif d.kind == "average":
            acc = torch.zeros(shape, dtype=dtype)
            for m, row in d.rows:
                acc = acc + tensors[m][row]
            rows[j] = acc / len(d.rows)
    for m, (slots, src) in donors.items():  # one gather per donor model
        rows[torch.tensor(slots, dtype=torch.long)] = tensors[m][torch.tensor(src, dtype=torch.long)].to(
            dtype
        )
    ids = torch.tensor([d.token_id for d in rule.defaults], dtype=torch.long)
    return DefaultRows(ids, rows)


def rebuild(x: torch.Tensor, rule: VocabularyRule, model: str, defaults: DefaultRows) -> torch.Tensor:
    """Model ``model``'s vocabulary tensor ``x`` (rows first) rebuilt for the output vocabulary (module
    docstring); ``defaults`` from :func:`default_rows`."""
    perm = rule.perms.get(model)
    if perm is None or (rule.identity and perm == tuple(range(rule.rows))):
        return x[: rule.rows]  # only cut: a view, no copy
    out = torch.zeros((rule.padded, *x.shape[1:]), dtype=x.dtype)
    p = torch.tensor(perm, dtype=torch.long)
    own = p >= 0
    if rule.forced:
        own[list(rule.forced)] = False
    idx = torch.nonzero(own).flatten()
    out[idx] = x[p[idx]]
    if len(defaults.ids):
        use = ~own[defaults.ids]  # a default where the model lacks the token or it is forced
        out[defaults.ids[use]] = defaults.rows[use].to(x.dtype)
    if rule.padded > rule.rows:
        out[rule.rows :] = torch.mean(out[: rule.rows], dim=0)
    return out
