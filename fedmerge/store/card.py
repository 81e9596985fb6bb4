"""The model card (``README.md``) written into every export: what the version is and what made it.

Hugging Face reads the YAML front matter (``library_name``, ``base_model``, ``tags``); people read the
rest: the version and its content hash, the base it descends from, the lineage (every version of the
first-parent chain with its aggregator, parameters and round), this version's aggregator and exact
parameters, its contributors, metrics and privacy accounting, and how to load the export.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedmerge.store.manifest import Version
    from fedmerge.store.reader import StoreReader

MODEL_CARD = "README.md"


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(", ", ": "))


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def model_card(
    store: StoreReader, version: Version, *, kind: str, extra: dict[str, Any] | None = None
) -> str:
    """Markdown for ``version``; ``kind`` is ``"full"`` (weights) or ``"peft"`` (adapter), ``extra``
    adds export facts (rank, residuals, skipped tensors) as a JSON block."""
    chain = store.chain(version)
    root = chain[0]
    base_name = root.name or root.id
    library = "peft" if kind == "peft" else "transformers"
    lines = [
        "---",
        f"library_name: {library}",
        f"base_model: {json.dumps(base_name)}",
        "tags:",
        "- fedmerge",
        "- federated-learning",
        "- model-merging",
        "---",
        "",
        f"# {base_name} — fedmerge version {version.id}",
        "",
        f"* version: `{version.id}` (content hash `{version.content_hash}`), created {version.created_at}",
        f"* base: `{root.id}` {base_name!r} (content hash `{root.content_hash}`)",
        f"* kind of export: {'peft LoRA adapter (θ_version − θ_base)' if kind == 'peft' else 'full weights'}",
        f"* written by fedmerge {version.fedmerge_version} (format {version.format_version})",
        "",
        "## Aggregator",
        "",
        f"`{version.method}` with parameters `{_json(version.params)}`"
        + ("" if version.round is None else f", round {version.round}"),
        "",
        "## Lineage (first parents, oldest first)",
        "",
        "| version | kind | aggregator | parameters | round | contributors |",
        "|---|---|---|---|---|---|",
    ]
    for v in chain:
        accepted = sum(c.accepted for c in v.contributors)
        lines.append(
            f"| {v.id} | {v.kind} | {_cell(v.method)} | {_cell(_json(v.params))} | "
            f"{'' if v.round is None else v.round} | {accepted} |"
        )
    if len(version.parents) > 1:
        lines += ["", f"Further parents (merged branches): {', '.join(version.parents[1:])}"]
    lines += ["", "## Contributors", ""]
    if version.contributors:
        lines += ["| client | examples | submission sha256 | accepted | reason |", "|---|---|---|---|---|"]
        for c in version.contributors:
            lines.append(
                f"| {_cell(c.client_id)} | {c.num_examples} | `{c.submission_hash[:16]}…` | "
                f"{'yes' if c.accepted else 'no'} | {_cell(c.reason or '')} |"
            )
    else:
        lines.append("none (a base version)")
    lines += ["", "## Metrics", "", f"`{_json(version.metrics)}`" if version.metrics else "none recorded"]
    if version.privacy is not None:
        lines += ["", "## Privacy", "", f"`{_json(version.privacy)}`"]
    if extra:
        lines += ["", "## Export", "", "```json", json.dumps(extra, indent=1, sort_keys=True), "```"]
    lines += ["", "## Loading", "", "```python"]
    if kind == "peft":
        lines += [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM  # or the Auto class of the base",
            "base = AutoModelForCausalLM.from_pretrained(BASE_DIR)  # the base version's export",
            "model = PeftModel.from_pretrained(base, THIS_DIR)",
        ]
    else:
        lines += [
            "from transformers import AutoModelForCausalLM  # or the Auto class of the architecture",
            "model = AutoModelForCausalLM.from_pretrained(THIS_DIR)",
        ]
    lines += ["```", "", "`fedmerge-version.json` holds the full manifest of this version.", ""]
    return "\n".join(lines)
