"""Multi-document recipes, as ``mergekit-multi``: several merges in one YAML file (documents separated
by ``---``), each but at most one with a ``name``; a model reference equal to another document's name
is that merge's result. The documents run in dependency order (a name used before its document is
fine, a cycle is refused); each named result is committed to the store as an intermediate version and
the later documents read it as ``store:ID``. The result is the unnamed document's (else the last to
run), and only it is exported."""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from fedmerge.recipes.schema import Recipe, RecipeSchemaError, parse_recipe, read_recipe_text


def load_documents(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The YAML documents of a recipe file (empty documents skipped)."""
    p = Path(path)
    text = read_recipe_text(p)
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise RecipeSchemaError(f"{p} is not valid YAML: {exc}") from None
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            raise RecipeSchemaError(f"{p}: document {i + 1} must be a mapping, got {type(d).__name__}")
    return docs


def _references(doc: dict[str, Any]) -> list[str]:
    refs = [doc.get("base_model")]
    refs += [m.get("model") if isinstance(m, dict) else m for m in doc.get("models") or []]
    for sl in doc.get("slices") or []:
        if isinstance(sl, dict):
            refs += [s.get("model") for s in sl.get("sources") or [] if isinstance(s, dict)]
    return [r for r in refs if isinstance(r, str)]


def _substitute(doc: dict[str, Any], done: dict[str, str]) -> dict[str, Any]:
    """``doc`` with references to finished merges replaced by ``store:VERSION``."""
    out = copy.deepcopy(doc)
    out.pop("name", None)

    def sub(v: Any) -> Any:
        return f"store:{done[v]}" if isinstance(v, str) and v in done else v

    if "base_model" in out:
        out["base_model"] = sub(out["base_model"])
    out["models"] = [
        ({**m, "model": sub(m.get("model"))} if isinstance(m, dict) else sub(m))
        for m in out.get("models") or []
    ] or out.get("models")
    for sl in out.get("slices") or []:
        for s in sl.get("sources") or []:
            s["model"] = sub(s.get("model"))
    return {k: v for k, v in out.items() if v is not None or k not in ("models",)}


def order(docs: Sequence[dict[str, Any]], source: str) -> list[int]:
    """Document indices in dependency order (file order where free); refuses duplicate names, more
    than one unnamed document, and cycles."""
    names: dict[str, int] = {}
    unnamed = []
    for i, d in enumerate(docs):
        n = d.get("name")
        if n is None:
            unnamed.append(i)
            continue
        if not isinstance(n, str) or not n:
            raise RecipeSchemaError(
                f"{source}: document {i + 1}'s name must be a non-empty string, got {n!r}"
            )
        if n in names:
            raise RecipeSchemaError(f"{source}: two documents are named {n!r}")
        names[n] = i
    if len(unnamed) > 1:
        raise RecipeSchemaError(
            f"{source}: documents {[i + 1 for i in unnamed]} have no name; all but the final merge need one"
        )
    out: list[int] = []
    state: dict[int, str] = {}

    def visit(i: int, path: list[str]) -> None:
        if state.get(i) == "done":
            return
        if state.get(i) == "active":
            raise RecipeSchemaError(
                f"{source}: the merges depend on each other in a cycle: {' → '.join(path)}"
            )
        state[i] = "active"
        for r in _references(docs[i]):
            if r in names:
                visit(names[r], [*path, r])
        state[i] = "done"
        out.append(i)

    for i in range(len(docs)):
        visit(i, [str(docs[i].get("name", "(final)"))])
    return out


def run_documents(
    path: str | os.PathLike[str],
    docs: Sequence[dict[str, Any]],
    run_one: Callable[[Recipe, bool], Any],
) -> Any:
    """Run every document with ``run_one(recipe, is_final)`` (which commits and returns a result with
    ``version``); all are parsed and checked first, so a schema error commits nothing."""
    source = str(path)
    root = Path(path).resolve().parent
    idx = order(docs, source)
    names = {d["name"] for d in docs if d.get("name") is not None}
    for i in idx:  # schema of every document before any merge (references to names as placeholders)
        placeholder = {n: "v000000" for n in names}
        parse_recipe(_substitute(dict(docs[i]), placeholder), root=root)
    final = next((i for i in idx if docs[i].get("name") is None), idx[-1])
    done: dict[str, str] = {}
    result: Any = None
    for i in idx:
        recipe = parse_recipe(_substitute(dict(docs[i]), done), root=root)
        recipe = dataclasses.replace(recipe, source=source)
        r = run_one(recipe, i == final)
        if docs[i].get("name") is not None:
            done[docs[i]["name"]] = r.version
        if i == final:
            result = r
    return result
