"""Train a preference classifier on generated (instruction, response, class) data.

The loss is the paper's token-level cross-entropy: at every response position t, the classifier sees
the prefix (instruction *without* the preference request, then the response up to t) and the observed
next token, and is asked for the response's class. The backbone is frozen, so its hidden states are
computed once and the head trains on them alone.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional
from tqdm.auto import tqdm

from cliper_integrations.core.classifier import PreferenceClassifier
from cliper_integrations.core.models import LoadedModel
from cliper_integrations.core.preferences import AXES, DEFAULT_CLASSES
from cliper_integrations.core.prompting import instruction_text, render_chat
from cliper_integrations.training.data import read_jsonl


@dataclass
class TrainConfig:
    data: Path
    output: Path
    classes: tuple[str, ...] = DEFAULT_CLASSES
    val_fraction: float = 0.15
    epochs: int = 40
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    dropout: float = 0.2
    batch_size: int = 1024
    patience: int = 4
    head_size: int = 256
    seed: int = 0
    feature_cache: Path | None = None
    """Folder for encoded features (None: encode every time)."""


@dataclass
class EncodedSet:
    """Frozen-backbone features: one row per (response position, observed next token)."""

    hidden: torch.Tensor  # [N, H] prefix states
    next_ids: torch.Tensor  # [N] observed next tokens
    labels: torch.Tensor  # [N] class index of the response
    response: torch.Tensor  # [N] index of the response each row came from
    response_labels: torch.Tensor  # [R]


def load_rows(path: Path, classes: tuple[str, ...]) -> tuple[list[dict], int]:
    """Usable rows (known class, not a refusal); also how many refusals were dropped."""
    rows, refusals = [], 0
    for row in read_jsonl(path):
        if row.get("refusal"):
            refusals += 1
        elif row["class"] in classes and row["response"].strip():
            rows.append(row)
    return rows, refusals


def split_by_instruction(rows: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Every response to one instruction lands on the same side, so validation sees unseen prompts."""
    ids = sorted({row["id"] for row in rows})
    random.Random(seed).shuffle(ids)
    val_ids = set(ids[: max(1, round(len(ids) * val_fraction))])
    return [r for r in rows if r["id"] not in val_ids], [r for r in rows if r["id"] in val_ids]


@torch.no_grad()
def encode(
    classifier: PreferenceClassifier,
    base: LoadedModel,
    rows: list[dict],
    classes: tuple[str, ...],
    batch_size: int = 8,
    desc: str = "Encoding",
) -> EncodedSet:
    """Run the frozen backbone over prompt + response (+ end-of-turn) and keep the response positions."""
    tokenizer = base.tokenizer
    eos = base.model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    hidden, next_ids, labels, response = [], [], [], []
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch"):
        batch = rows[start : start + batch_size]
        sequences, prompt_lengths = [], []
        for row in batch:
            prompt = render_chat(tokenizer, [{"role": "user", "content": instruction_text(row)}])
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer_ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
            if not row.get("truncated") and eos is not None:
                answer_ids = [*answer_ids, eos]
            sequences.append(prompt_ids + answer_ids)
            prompt_lengths.append(len(prompt_ids))
        width = max(map(len, sequences))
        ids = torch.full((len(batch), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for index, sequence in enumerate(sequences):  # left padding, as at generation time
            ids[index, width - len(sequence) :] = torch.tensor(sequence)
            mask[index, width - len(sequence) :] = 1
        states = classifier.backbone.base_model(
            input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
        ).last_hidden_state.float()
        for index, (sequence, prompt_length) in enumerate(zip(sequences, prompt_lengths, strict=True)):
            offset = width - len(sequence)
            # the state after token t predicts token t+1: from the last prompt token to the end
            positions = torch.arange(offset + prompt_length - 1, width - 1)
            hidden.append(states[index, positions])
            next_ids.append(ids[index, positions + 1])
            labels.append(torch.full((len(positions),), classes.index(batch[index]["class"])))
            response.append(torch.full((len(positions),), start + index))
    return EncodedSet(
        torch.cat(hidden),
        torch.cat(next_ids),
        torch.cat(labels),
        torch.cat(response),
        torch.tensor([classes.index(row["class"]) for row in rows]),
    )


def encode_cached(
    classifier: PreferenceClassifier,
    base: LoadedModel,
    rows: list[dict],
    classes: tuple[str, ...],
    cache: Path | None,
    desc: str,
) -> EncodedSet:
    """``encode``, kept as safetensors under ``cache`` keyed by the rows, classes and backbone: encoding
    through the frozen backbone takes minutes, training the head on the features seconds."""
    if cache is None:
        return encode(classifier, base, rows, classes, desc=desc)
    key = hashlib.sha256(
        json.dumps([rows, classes, classifier.config.kind, classifier.config.backbone, base.name]).encode()
    ).hexdigest()[:24]
    path = cache / f"{key}.safetensors"
    if path.exists():
        return EncodedSet(**load_file(path))
    encoded = encode(classifier, base, rows, classes, desc=desc)
    cache.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in asdict(encoded).items()}, path)
    return encoded


def evaluate(classifier: PreferenceClassifier, data: EncodedSet, classes: tuple[str, ...]) -> dict:
    """Token- and response-level accuracy, 6-way and per axis (own pole vs the opposite pole)."""
    with torch.no_grad():
        log_probs = torch.cat(
            [
                classifier.token_log_probs(data.hidden[i : i + 4096], data.next_ids[i : i + 4096])
                for i in range(0, len(data.labels), 4096)
            ]
        )
    loss = functional.nll_loss(log_probs, data.labels).item()
    num_responses = len(data.response_labels)
    sums = torch.zeros(num_responses, len(classes)).index_add_(0, data.response, log_probs)
    counts = torch.bincount(data.response, minlength=num_responses).clamp(min=1)
    response_scores = sums / counts[:, None]
    metrics: dict = {
        "loss": loss,
        "token_accuracy": (log_probs.argmax(-1) == data.labels).float().mean().item(),
        "response_accuracy": (response_scores.argmax(-1) == data.response_labels).float().mean().item(),
        "axes": {},
    }
    for axis, (first, second) in AXES.items():
        if first not in classes or second not in classes:
            continue
        pair = torch.tensor([classes.index(first), classes.index(second)])
        token_rows = (data.labels == pair[0]) | (data.labels == pair[1])
        response_rows = (data.response_labels == pair[0]) | (data.response_labels == pair[1])
        token_pick = pair[log_probs[token_rows][:, pair].argmax(-1)]
        response_pick = pair[response_scores[response_rows][:, pair].argmax(-1)]
        metrics["axes"][axis] = {
            "token_accuracy": (token_pick == data.labels[token_rows]).float().mean().item(),
            "response_accuracy": (response_pick == data.response_labels[response_rows]).float().mean().item(),
            "responses": int(response_rows.sum()),
        }
    return metrics


def train_classifier(base: LoadedModel, config: TrainConfig, classifier: PreferenceClassifier | None = None) -> dict:
    """Train, early-stop on validation loss, save the best head and a metrics JSON; return the metrics."""
    torch.manual_seed(config.seed)
    rows, refusals = load_rows(config.data, config.classes)
    train_rows, val_rows = split_by_instruction(rows, config.val_fraction, config.seed)
    classifier = classifier or PreferenceClassifier.create(
        base, list(config.classes), head_size=config.head_size, seed=config.seed
    )
    train = encode_cached(classifier, base, train_rows, config.classes, config.feature_cache, "Encoding train")
    val = encode_cached(classifier, base, val_rows, config.classes, config.feature_cache, "Encoding validation")
    # Balance classes by token count, so long answers do not drown short ones.
    class_tokens = torch.bincount(train.labels, minlength=len(config.classes)).float().clamp(min=1)
    class_weight = class_tokens.sum() / (len(config.classes) * class_tokens)
    head = classifier.head
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    best, best_state, stale, history = float("inf"), None, 0, []
    generator = torch.Generator().manual_seed(config.seed)
    for epoch in (bar := tqdm(range(config.epochs), desc="Training", unit="epoch")):
        head.train()
        order = torch.randperm(len(train.labels), generator=generator)
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            hidden = functional.dropout(train.hidden[batch], config.dropout, training=True)
            log_probs = classifier.token_log_probs(hidden, train.next_ids[batch])
            loss = functional.nll_loss(log_probs, train.labels[batch], weight=class_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        head.eval()
        val_metrics = evaluate(classifier, val, config.classes)
        history.append(
            {
                "epoch": epoch + 1,
                "val_loss": val_metrics["loss"],
                "val_response_accuracy": val_metrics["response_accuracy"],
            }
        )
        bar.set_postfix(val_loss=f"{val_metrics['loss']:.4f}", val_resp=f"{val_metrics['response_accuracy']:.2f}")
        if val_metrics["loss"] < best - 1e-4:
            best, stale = val_metrics["loss"], 0
            best_state = {name: tensor.clone() for name, tensor in head.state_dict().items()}
        else:
            stale += 1
            if stale >= config.patience:
                break
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval()
    metrics = {
        "train": evaluate(classifier, train, config.classes),
        "validation": evaluate(classifier, val, config.classes),
        "data": {
            "file": str(config.data),
            "responses": len(rows),
            "refusals_dropped": refusals,
            "train_responses": len(train_rows),
            "validation_responses": len(val_rows),
            "train_instructions": len({r["id"] for r in train_rows}),
            "validation_instructions": len({r["id"] for r in val_rows}),
            "train_tokens": len(train.labels),
            "per_class": _count_by_class(rows),
        },
        "history": history,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
    }
    classifier.save(config.output)
    (Path(config.output) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _count_by_class(rows: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[row["class"]] += 1
    return dict(counts)
