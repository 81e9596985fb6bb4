"""A recipe's ``chat_template``, resolved as mergekit 0.1.5 does (``mergekit/merge.py``,
``_set_chat_template``) and written as the output's ``chat_template.jinja`` (the file
``transformers``' ``save_pretrained`` writes and ``AutoTokenizer.from_pretrained`` reads).

* ``auto``: the template most of the recipe's models carry (``chat_template.jinja``, else
  ``tokenizer_config.json``'s ``chat_template``: a string, or the ``default`` of a list of named ones),
  stripped; ties go to the model listed first. None of them has one: nothing is written.
* a name (shorter than 256 characters, no newline, no ``{``): a known prompt format —
  ``alpaca``, ``chatml``, ``exaone``, ``llama3`` or ``mistral`` (mergekit 0.1.5's names), each written
  here from the format's published description; they render every conversation as mergekit's
  templates do (tested against mergekit's renderings), except ``exaone``, whose mergekit template
  renders its Jinja lines' indentation into the prompt (fedmerge's does not);
* otherwise the text itself, which must be a Jinja template (at least 20 characters, with a ``{``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence

from fedmerge.recipes.schema import RecipeSchemaError

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"

NAMED: dict[str, str] = {
    # Alpaca: the last system message, a blank line, then "### Instruction:" / "### Input:" (a
    # ``user_context`` message) / "### Response:" sections with trimmed contents, a blank line between
    # them; the generation prompt follows the last section directly (as mergekit's template renders it)
    "alpaca": (
        "{%- set system = messages | selectattr('role', 'equalto', 'system') | list -%}\n"
        "{{- (system | last).content | trim if system else '' -}}\n"
        "{{- '\\n\\n' -}}\n"
        "{%- set headers = {'user': '### Instruction:\\n', 'assistant': '### Response:\\n', "
        "'user_context': '### Input:\\n'} -%}\n"
        "{%- for message in messages -%}\n"
        "{%- if message['role'] in headers -%}\n"
        "{{- headers[message['role']] + message['content'] | trim -}}\n"
        "{%- if not loop.last -%}{{- '\\n\\n' -}}{%- endif -%}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}"
        "{{- '### Response:\\n' -}}{%- endif -%}\n"
    ),
    # Mistral instruct: bos, then " [INST] user [/INST]" and " assistant</s>" alternating, an optional
    # first system message prepended to the first user turn; other orders or roles are refused
    "mistral": (
        "{%- if messages[0]['role'] == 'system' -%}\n"
        "{%- set system_message = messages[0]['content'] -%}\n"
        "{%- set loop_messages = messages[1:] -%}\n"
        "{%- else -%}\n"
        "{%- set loop_messages = messages -%}\n"
        "{%- endif -%}\n"
        "{{- bos_token -}}\n"
        "{%- for message in loop_messages -%}\n"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
        "{{- raise_exception('after an optional system message the roles must alternate user, assistant, "
        "user, assistant, ...') -}}\n"
        "{%- endif -%}\n"
        "{%- if message['role'] == 'user' -%}\n"
        "{%- set prefix = system_message + '\\n\\n' if loop.first and system_message is defined else '' -%}\n"
        "{{- ' [INST] ' + prefix + message['content'] + ' [/INST]' -}}\n"
        "{%- elif message['role'] == 'assistant' -%}\n"
        "{{- ' ' + message['content'] + eos_token -}}\n"
        "{%- else -%}\n"
        "{{- raise_exception('only user and assistant roles, after an optional system message') -}}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
    ),
    # EXAONE: "[|role|]content", a user turn ending in a newline, the others in "[|endofturn|]" and a
    # newline; an empty system turn first when the conversation has none
    "exaone": (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
        "{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
    # ChatML: "<|im_start|>role\ncontent<|im_end|>\n" per message; the prompt opens an assistant turn
    "chatml": (
        "{%- for turn in messages -%}\n"
        "{{- '<|im_start|>' ~ turn['role'] ~ '\\n' ~ turn['content'] ~ '<|im_end|>\\n' -}}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}\n"
    ),
    # Llama 3: bos, then "<|start_header_id|>role<|end_header_id|>\n\n" + trimmed content + "<|eot_id|>"
    # and a newline per message (as mergekit's renders); the prompt opens an assistant header
    "llama3": (
        "{{- bos_token if messages else '' -}}\n"
        "{%- for turn in messages -%}\n"
        "{{- '<|start_header_id|>' ~ turn['role'] ~ '<|end_header_id|>\\n\\n' -}}\n"
        "{{- (turn['content'] | trim) ~ '<|eot_id|>\\n' -}}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
        "{%- endif -%}\n"
    ),
}


def template_of(files: Mapping[str, bytes]) -> str | None:
    """The chat template a model directory's files carry (stripped), or None."""
    if CHAT_TEMPLATE_FILE in files:
        text = files[CHAT_TEMPLATE_FILE].decode("utf-8", errors="replace").strip()
        return text or None
    raw = files.get(TOKENIZER_CONFIG)
    if raw is None:
        return None
    try:
        template = json.loads(raw).get("chat_template")
    except (ValueError, AttributeError):
        return None
    if isinstance(template, list):
        template = next(
            (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
        )
    return (template.strip() or None) if isinstance(template, str) else None


def resolve_chat_template(spec: str | None, models: Sequence[Mapping[str, bytes]]) -> str | None:
    """The template text to write for ``spec`` (module docstring), given the models' files in recipe
    order; None when nothing is to be written."""
    if not spec:
        return None
    if spec == "auto":
        found = [t for t in (template_of(files) for files in models) if t is not None]
        return Counter(found).most_common(1)[0][0] if found else None
    if len(spec) < 256 and "\n" not in spec and "{" not in spec:
        if spec in NAMED:
            return NAMED[spec]
        if len(spec) < 20:
            raise RecipeSchemaError(
                f"chat_template {spec!r} is not a known name ({', '.join(sorted(NAMED))}, or 'auto'); "
                "give the template's Jinja text instead"
            )
    if len(spec) < 20 or "{" not in spec:
        raise RecipeSchemaError(f"chat_template {spec[:40]!r} is neither a known name nor a Jinja template")
    return spec


def with_chat_template(files: Mapping[str, bytes], template: str) -> dict[str, bytes]:
    """``files`` with ``chat_template.jinja`` set to ``template`` (and no competing ``chat_template``
    key left in ``tokenizer_config.json``)."""
    out = dict(files)
    out[CHAT_TEMPLATE_FILE] = template.encode()
    raw = out.get(TOKENIZER_CONFIG)
    if raw is not None:
        try:
            config = json.loads(raw)
        except ValueError:
            config = None
        if isinstance(config, dict) and "chat_template" in config:
            del config["chat_template"]
            out[TOKENIZER_CONFIG] = json.dumps(config, indent=2).encode()
    return out
