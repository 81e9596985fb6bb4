r"""A ClientApp for federated LoRA fine-tuning of your own Hugging Face causal LM with fedmerge.

It uses only Flower's API, transformers/peft and fedmerge's client library (two calls:
:func:`fedmerge.flower.client.base_weights` and :func:`fedmerge.flower.client.fedmerge_reply`).
Each SuperNode names two local paths::

    flower-supernode ... \
        --node-config "model-dir='/models/my-lm' data-path='/data/notes.txt' client-id='inst-a'"

``model-dir`` holds the base model's ``config.json`` and tokenizer (the weights come from the server:
in full once, then each round the compressed update since the version the node holds, rebuilt and
checked by ``base_weights``); ``data-path`` is a private text file, one training example per line. Per
round the node builds the model from the config, loads the round's base weights, wraps it with a peft
LoRA adapter (rank ``lora-rank``, alpha ``lora-alpha`` from the run config), trains ``local-epochs``
passes with AdamW at ``lr``, and replies the compressed merged update ΔW = (α/r)·B·A of the adapted
weights (top-k + int4 with error feedback in this app's run config; the server's run config decides).

Per ``evaluate`` message (after a round, with ``fraction-evaluate`` > 0) the node loads the sent weights
from Flower's ``"arrays"`` (bf16 arrives widened to fp32, exact values) into the model and replies its
mean token loss and perplexity on its own text with ``num-examples`` (Flower's evaluate answer).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from fedmerge.flower.client import base_weights, fedmerge_reply

app = ClientApp()

TARGET_MODULES = ["q_proj", "v_proj"]
MAX_LENGTH = 48


def local_path(context: Context, key: str) -> Path:
    """The node-config path ``key``; FileNotFoundError naming it (the server records it) otherwise."""
    if key not in context.node_config:
        hint = f'start the SuperNode with --node-config "{key}=..."'
        raise FileNotFoundError(f"node config has no {key!r}; {hint}")
    path = Path(str(context.node_config[key])).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{key} {str(path)!r} does not exist on this node")
    return path


def read_lines(data_path: Path) -> list[str]:
    """The non-empty lines of the node's text file (ValueError when there are none)."""
    lines = [ln for ln in data_path.read_text().splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"data-path {str(data_path)!r} holds no text")
    return lines


def mean_token_loss(weights: dict[str, torch.Tensor], model_dir: Path, lines: list[str]) -> float:
    """The mean token loss of the model ``weights`` (built from ``model_dir``'s config) on ``lines``."""
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    model.load_state_dict(weights)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = tokenizer(lines, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    return float(out.loss)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    assert isinstance(config, ConfigRecord)
    model_dir, data_path = local_path(context, "model-dir"), local_path(context, "data-path")
    lines = read_lines(data_path)

    round_ = int(str(config["server-round"]))
    stream = round_ + 1_000_003 * int(str(config.get("seed", 0)))  # the run's seed, then the round
    torch.manual_seed(stream)  # LoRA's A init; reproducible per (seed, round)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    model.load_state_dict(base_weights(msg, context))  # this round's base (cached between rounds)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = tokenizer(lines, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    lora = LoraConfig(
        r=int(str(config.get("lora-rank", 4))),
        lora_alpha=float(str(config.get("lora-alpha", 8.0))),  # type: ignore[arg-type]  # peft: alpha / r
        target_modules=TARGET_MODULES, lora_dropout=0.0,
    )  # fmt: skip
    peft_model = get_peft_model(model, lora)
    if str(config.get("lora-freeze-a", False)).lower() == "true":  # this app's own run-config key
        # federated LoRA with A frozen (FFA-LoRA, Sun et al., ICLR 2024): every node of a round draws
        # the same A (the seed above), trains only B, so ΔW = (α/r)·B·A shares A and the mean of the
        # nodes' ΔW is itself rank r: (α/r)·mean(B)·A — what a rank-r factor pair carries exactly
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad],
                                  lr=float(str(config.get("lr", 1e-3))))  # fmt: skip
    batch_size = int(str(config.get("batch-size", 8)))
    gen = torch.Generator().manual_seed(stream)
    peft_model.train()
    loss_sum, steps = 0.0, 0
    for _ in range(int(str(config.get("local-epochs", 1)))):
        for idx in torch.randperm(len(lines), generator=gen).split(batch_size):
            out = peft_model(input_ids=batch["input_ids"][idx], attention_mask=batch["attention_mask"][idx],
                             labels=labels[idx])  # fmt: skip
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            loss_sum, steps = loss_sum + float(out.loss), steps + 1
    loss = loss_sum / max(steps, 1)
    metrics = {"train-loss": loss, "train-perplexity": math.exp(min(loss, 50.0))}
    return fedmerge_reply(msg, context, peft_model, num_examples=len(lines), metrics=metrics)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model_dir, data_path = local_path(context, "model-dir"), local_path(context, "data-path")
    weights = msg.content.array_records["arrays"].to_torch_state_dict()
    lines = read_lines(data_path)
    loss = mean_token_loss(weights, model_dir, lines)
    perplexity = math.exp(min(loss, 50.0))
    metrics = MetricRecord({"loss": loss, "perplexity": perplexity, "num-examples": len(lines)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
