"""mergekit 0.1.5's named chat templates: fedmerge's own texts of the formats render every
conversation as mergekit's templates do (``expected/chat_templates.json``: mergekit's renderings,
made by ``tools/mergekit_fixtures.py``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedmerge.recipes import run_recipe

transformers = pytest.importorskip("transformers")

MODELS = Path(__file__).resolve().parent.parent / "fixtures" / "mergekit" / "models"
CHAT = Path(__file__).resolve().parent.parent / "fixtures" / "mergekit" / "expected" / "chat_templates.json"


def _markers_only(text: str) -> str:
    """EXAONE's turns with the whitespace around its ``[|…|]`` markers removed: mergekit's template
    renders its Jinja lines' indentation there."""
    return re.sub(r"\s*(\[\|[a-z_]+\|\])\s*", r"\1", text).strip()


@pytest.mark.parametrize("name", ["alpaca", "chatml", "exaone", "llama3", "mistral"])
def test_named_chat_templates_render_as_mergekits(name: str) -> None:
    """Each named template renders every conversation (system messages, alternation, an Alpaca input,
    an assistant first, with and without the generation prompt) as mergekit 0.1.5's template of that
    name, through transformers' apply_chat_template; a conversation mergekit's refuses is refused."""
    from fedmerge.recipes.chat_templates import NAMED

    data = json.loads(CHAT.read_text())
    tok = transformers.AutoTokenizer.from_pretrained(str(MODELS / "a"))
    want = iter(data["rendered"][name])
    for conversation in data["conversations"]:
        for generation in (False, True):
            expected = next(want)
            if expected.startswith("error: "):
                with pytest.raises(Exception, match=r"roles|alternate") as refused:
                    tok.apply_chat_template(
                        conversation,
                        chat_template=NAMED[name],
                        tokenize=False,
                        add_generation_prompt=generation,
                    )
                assert type(refused.value).__name__ == expected.removeprefix("error: ")
                continue
            got = tok.apply_chat_template(
                conversation, chat_template=NAMED[name], tokenize=False, add_generation_prompt=generation
            )
            if name == "exaone":
                got, expected = _markers_only(str(got)), _markers_only(expected)
            assert got == expected, (conversation, generation)


def test_a_named_chat_template_is_written_for_the_tokenizer(tmp_path: Path) -> None:
    models = [str(MODELS / m) for m in ("a", "b")]
    run_recipe(
        {"merge_method": "linear", "models": models, "chat_template": "mistral"},
        tmp_path / "s",
        export=tmp_path / "o",
    )
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "o"))
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text == "<s> [INST] Hi [/INST]"
