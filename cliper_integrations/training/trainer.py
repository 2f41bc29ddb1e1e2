"""Train a preference classifier on generated (instruction, response, class) data.

The loss is the paper's token-level cross-entropy: at every response position t, the classifier sees
the prefix (instruction *without* the preference request, then the response up to t) and the observed
next token, and is asked for the response's class. The backbone is frozen, so its hidden states are
computed once and the head trains on them alone.

A bayes-form classifier (``core/classifier.py``) reads the observed token among the base model's top-k
candidates, and adds a generative term: -log p(x_t | prefix, c) over those candidates, for the
response's class c. It asks the head which *tokens* class c prefers, not only which class the prefix
is, so its scores differ between candidates: what guidance needs to move an answer.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional
from tqdm.auto import tqdm

from cliper_integrations.core.classifier import PreferenceClassifier, compose
from cliper_integrations.core.engine import DEFAULT_CLASSIFIER, default_classifier_path, left_padded
from cliper_integrations.core.errors import ModelResolutionError
from cliper_integrations.core.models import LoadedModel
from cliper_integrations.core.preferences import (
    AXES,
    BACKGROUND_CLASSES,
    REFUSAL,
    TRAINABLE_CLASSES,
    UNREQUESTED,
    axis_of,
    is_refusal,
)
from cliper_integrations.core.prompting import instruction_text, render_chat, with_preference_request
from cliper_integrations.training.data import echoes_request, is_degenerate, keep_contrasting, read_jsonl


@dataclass
class TrainConfig:
    data: Sequence[Path]
    """One or more JSONL files written by ``cliper data generate`` (possibly by different models)."""
    output: Path
    classes: tuple[str, ...] = TRAINABLE_CLASSES
    val_fraction: float = 0.15
    epochs: int = 40
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    dropout: float = 0.2
    batch_size: int = 1024
    patience: int = 4
    head_size: int = 256
    shift_rank: int = 0
    """Rank of the head's bilinear shift term (``core/classifier.py``; 0: the MLP alone)."""
    seed: int = 0
    feature_cache: Path | None = None
    """Folder for encoded features, one file per response (None: encode every time)."""
    form: Literal["direct", "bayes"] = "bayes"
    class_prior: Literal["uniform", "learned"] = "uniform"
    """Bayes form: a uniform class prior, or a learned p(c | prefix) (see ``core/classifier.py``)."""
    generative_weight: float = 0.5
    """Bayes form: loss = (1 - w) · class cross-entropy + w · class-conditional next-token loss."""
    response_weight: float = 0.0
    """Weight of a response-level term: the class of each whole response from the sum of its tokens'
    class log-probs (what response accuracy reads), trained beside the token-level loss."""
    posterior: Literal["joint", "axis", "part", "main-joint"] = "joint"
    """Normalise each class's posterior over all classes, over its own axis, over its own head part's
    classes, or so for the parts' classes while the main head's stay joint over its own rows
    (``core/classifier.py``; "part" and "main-joint" mean something only with head parts)."""
    prior_on: Path | None = None
    """Fit only a learned class prior on top of this saved bayes classifier that guides with a uniform
    prior ("default": the one packaged for the base model): its likelihood head is copied and frozen, so
    the tokens each class prefers stay exactly as they were."""
    head_parts_from: Sequence[tuple[Sequence[str], Path]] = ()
    """With ``prior_on``: (classes, classifier folder) pairs whose classes are scored by that trained
    classifier's head instead (``core/classifier.py``, ``compose``), so that one axis can take a head
    trained for it while the others keep ``prior_on``'s; the prior is then fitted on the composed head."""
    main_guided_classes: tuple[str, ...] = ()
    """With ``prior_on`` and the ``main-joint`` posterior: parts' classes that keep the main head's
    posterior (``core/classifier.py``), so a part joins for the other pole of their axis alone."""
    prior_from: Path | None = None
    """With ``prior_on``: start the prior from this classifier's learned prior ("default": the packaged
    one's) instead of afresh; with ``epochs`` 0 it is kept as it is. A prior depends on the prefix only,
    so one fitted beside another head can read a head whose parts changed (a new tone head keeps the
    packaged prior's reading of the other axes exactly)."""
    guidance_prior: Literal["learned", "uniform"] = "learned"
    """With a learned prior: whether decoding uses it too (``core/classifier.py``)."""
    prior_layer: int | None = None
    """The backbone layer a reading-only learned prior reads (None: the final state)."""
    prior_pooling: Literal["last", "mean"] = "last"
    """What the prior reads of that layer at a position: its state, or the answer's mean state up to it."""
    candidates: int = 32
    """Bayes form: the base model's top-k tokens the observed one is scored among (as at decoding)."""
    contrast_filter: bool = True
    """Train and validate only on answers whose text shows their class against the opposite pole
    (``keep_contrasting``); validation is also scored on every usable answer, as ``validation_unfiltered``."""
    pole_limits: dict[str, float] = field(default_factory=dict)
    """With the contrast filter: per class, a bound the training answers' axis measure must also pass in
    the pole's direction (``within_limit``; e.g. unfriendly 0: VADER at most 0). Validation keeps the
    plain contrast rule, so its figures compare with runs without limits."""
    teacher_classes: tuple[str, ...] = ()
    """Bayes form: classes whose next-token distribution is also taught by the base model itself, asked
    for the class in the prompt (DESIGN.md's prompted copies). At every position of the answers on these
    classes' axes, the head's p(x | prefix, c) over the candidates is pulled towards p_LM(x | prefix,
    request for c): a target for every candidate, where the token-level loss has only the observed one,
    and sentiment words that a class's answers leave out are taught as well as those they use."""
    teacher_answers: Literal["axis", "all"] = "axis"
    """Which answers the teacher reads: those on the teacher classes' own axes, or every answer (the
    prefixes guidance meets are the base model's own answers, not text already in one of the poles)."""
    teacher_weight: float = 1.0
    """Weight of the teacher term (KL divergence of the head's candidate distribution from the prompted
    base model's), added to the token-level loss and to the validation loss early stopping reads."""

    def __post_init__(self) -> None:
        if self.prior_on is not None:
            self.class_prior = "learned"  # what fitting a prior on top means
        self.teacher_classes = tuple(self.teacher_classes)
        if unknown := [name for name in self.teacher_classes if name not in self.classes or not axis_of(name)]:
            raise ValueError(f"Teacher classes must be trained classes on a preference axis: {unknown}")
        if self.pole_limits and not self.contrast_filter:
            raise ValueError("Pole limits refine the contrast filter: they need it on")
        if not all(math.isfinite(limit) for limit in self.pole_limits.values()):
            raise ValueError(f"Pole limits must be finite, got {self.pole_limits}")
        if self.teacher_answers not in ("axis", "all"):
            raise ValueError(f"teacher_answers must be 'axis' or 'all', not {self.teacher_answers!r}")
        self.main_guided_classes = tuple(self.main_guided_classes)
        if self.main_guided_classes and self.posterior != "main-joint":
            raise ValueError("Classes guided by the main head need the main-joint posterior")
        if (self.head_parts_from or self.prior_from or self.main_guided_classes) and self.prior_on is None:
            raise ValueError("Head parts and a borrowed prior go on a trained classifier's head: they need --prior-on")
        if self.teacher_classes and (self.form != "bayes" or self.prior_on is not None):
            raise ValueError("A teacher trains a bayes-form likelihood head (not a prior fitted on top)")


@dataclass
class EncodedSet:
    """Frozen-backbone features: one row per (response position, observed next token)."""

    features: dict[str, torch.Tensor]
    """``hidden`` [N, H] prefix states (float16 to halve memory; the head reads them as float32),
    ``next_ids`` [N] observed next tokens; for the bayes form also ``candidates`` [N, k] (the base
    model's top-k), ``candidate_log_lm`` [N, k] and ``next_log_lm`` [N] (base log-probs); with a prior
    on another layer, ``prior_hidden`` [N, H] (float16) that layer's states."""
    labels: torch.Tensor  # [N] class index of the response
    response: torch.Tensor  # [N] index of the response each row came from
    response_labels: torch.Tensor  # [R]
    teacher: torch.Tensor | None = None
    """[N, k, C] the prompted base model's log-probs of the ``candidates`` for each of ``teacher_classes``
    (NaN on rows it did not read)."""
    teacher_classes: tuple[str, ...] = ()

    def response_lengths(self) -> torch.Tensor:
        """Rows (tokens) per response [R]."""
        return torch.bincount(self.response, minlength=len(self.response_labels))

    def sum_per_response(self, values: torch.Tensor) -> torch.Tensor:
        """Row values [N, K] summed over each response's rows [R, K]."""
        return values.new_zeros(len(self.response_labels), values.shape[-1]).index_add_(0, self.response, values)

    def select(self, rows: torch.Tensor | slice) -> dict[str, torch.Tensor]:
        """The features of ``rows``, named as ``PreferenceClassifier.token_log_probs`` takes them."""
        picked = {name: tensor[rows] for name, tensor in self.features.items()}
        for name in STATES:
            if name in picked:
                picked[name] = picked[name].float()
        return picked


Features = dict[str, torch.Tensor]
"""One response's ``hidden`` [T, H] and ``next_ids`` [T] (and, for the bayes form, base candidates; with a
prior on another layer, ``prior_hidden`` [T, H])."""
BAYES_FEATURES = ("candidates", "candidate_log_lm", "next_log_lm")
STATES = ("hidden", "prior_hidden")
UNLABELLED = -100
"""The label of the positions of an answer written with no request: the losses leave them out (PyTorch's
``ignore_index``), and only the teacher reads them."""


def judge_row(row: dict, classes: tuple[str, ...]) -> tuple[dict | None, str | None]:
    """What training makes of one generated row: the row to train (relabelled ``refusal`` where it
    declines and that class is trained) and None, or None and why it is dropped (refusals, degenerate,
    echoes, refusal_requests_answered), or None and None for a class not among ``classes`` (``UNREQUESTED``
    rows are kept: a teacher reads them). Judged from the text, so rows written before a check existed are
    judged the same way."""
    refused = bool(row.get("refusal")) or is_refusal(row["response"])
    if refused and REFUSAL in classes:
        return {**row, "class": REFUSAL}, None
    if refused:
        return None, "refusals"
    if row["class"] == REFUSAL:
        return None, "refusal_requests_answered"
    if is_degenerate(row["response"]):
        return None, "degenerate"
    if echoes_request(row["response"], row["class"]):
        return None, "echoes"
    return (row, None) if row["class"] in classes or row["class"] == UNREQUESTED else (None, None)


def load_rows(paths: Sequence[Path], classes: tuple[str, ...]) -> tuple[list[dict], Counter]:
    """Usable rows from every file (``judge_row``), and counts of what was dropped: refusals, answers stuck
    in a loop and answers that echo their request.

    With the background class ``refusal`` among ``classes``, a refusal is kept as that class whatever was
    asked for, and an answer to the request to decline that does not decline is dropped."""
    rows, dropped = [], Counter()
    for path in paths:
        for row in read_jsonl(path):
            kept, reason = judge_row(row, classes)
            if kept is not None:
                rows.append(kept)
            elif reason is not None:
                dropped[reason] += 1
    return rows, dropped


def split_by_instruction(rows: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Every response to one instruction lands on the same side, so validation sees unseen prompts.

    An instruction's side depends only on its id and the seed, so adding data never moves an
    instruction across and validation scores stay comparable as the data set grows.
    """

    def in_validation(instruction_id: str) -> bool:
        digest = hashlib.sha256(f"{seed}:{instruction_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") < val_fraction * 2**64

    val_ids = {row["id"] for row in rows if in_validation(row["id"])}
    return [r for r in rows if r["id"] not in val_ids], [r for r in rows if r["id"] in val_ids]


def _token_sequence(base: LoadedModel, row: dict, request: str | None = None) -> tuple[list[int], int]:
    """Prompt (instruction without the preference request, or with ``request``'s, as the data was
    generated) + response (+ end-of-turn) ids; prompt length."""
    tokenizer = base.tokenizer
    eos = base.model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    messages = [{"role": "user", "content": instruction_text(row)}]
    if request is not None:
        messages = with_preference_request(messages, {request: 1.0})
    prompt = render_chat(tokenizer, messages)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
    if not row.get("truncated") and eos is not None:
        answer_ids = [*answer_ids, eos]
    return prompt_ids + answer_ids, len(prompt_ids)


@torch.no_grad()
def _backbone_pass(
    classifier: PreferenceClassifier, base: LoadedModel, rows: list[dict], request: str | None = None
) -> tuple[object, torch.Tensor, list[torch.Tensor]]:
    """Run the frozen backbone over prompt + response of each row (left-padded, as at generation time):
    its outputs, the padded ids, and each row's response positions (the state after token t predicts
    token t+1: from the last prompt token to the end)."""
    sequences, prompt_lengths = zip(*(_token_sequence(base, row, request) for row in rows), strict=True)
    ids, mask = left_padded(sequences, base.tokenizer.pad_token_id or 0)
    width = ids.shape[1]
    outputs = classifier.backbone.base_model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        output_hidden_states=request is None and classifier.config.prior_layer is not None,
    )
    positions = [
        torch.arange(width - len(sequence) + prompt_length - 1, width - 1)
        for sequence, prompt_length in zip(sequences, prompt_lengths, strict=True)
    ]
    return outputs, ids, positions


def _encode_batch(classifier: PreferenceClassifier, base: LoadedModel, rows: list[dict]) -> list[Features]:
    """The response positions' final states and next tokens of each row (and the states of the layer the
    prior reads, when that is not the last)."""
    outputs, ids, row_positions = _backbone_pass(classifier, base, rows)
    layer = classifier.config.prior_layer
    features = []
    for index, positions in enumerate(row_positions):
        feature = {"hidden": outputs.last_hidden_state[index, positions], "next_ids": ids[index, positions + 1]}
        if layer is not None:
            feature["prior_hidden"] = outputs.hidden_states[layer][index, positions]
        features.append({name: tensor.half() if name in STATES else tensor for name, tensor in feature.items()})
    return features


def _teacher_batch(
    classifier: PreferenceClassifier, base: LoadedModel, rows: list[dict], features: list[Features], request: str
) -> list[torch.Tensor]:
    """For each row, the base model's log-probs of its ``candidates`` [T, k] at every response position
    when the prompt also asks for ``request``: the same answer, teacher-forced under the request."""
    outputs, _, row_positions = _backbone_pass(classifier, base, rows, request)
    return [
        classifier.base_log_probs(outputs.last_hidden_state[index, positions])
        .gather(-1, feature["candidates"].long())
        .half()
        for index, (positions, feature) in enumerate(zip(row_positions, features, strict=True))
    ]


def encode_rows(
    classifier: PreferenceClassifier,
    base: LoadedModel,
    rows: list[dict],
    cache: Path | None,
    batch_size: int = 8,
    desc: str = "Encoding",
    candidates: int = 0,
) -> list[Features]:
    """Features for every row, in order. Rows run in length order (little padding) and each response is
    kept under ``cache``, keyed by its text and the backbone: encoding through the frozen backbone takes
    seconds per response, training the head on the features seconds in all, and data sets grow.
    ``candidates`` > 0 adds the base model's top-k candidates at each position (bayes form). The states of
    the layer a prior reads are cached as ``hidden.<layer>``, beside the rest of the response's features."""
    layer_name = _layer_name(classifier)
    keys = _feature_keys(classifier, base, rows)
    features: dict[int, Features] = {}
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        for index, key in enumerate(keys):
            if (path := cache / f"{key}.safetensors").exists():
                features[index] = load_file(path)
                if layer_name is not None and layer_name in features[index]:
                    features[index]["prior_hidden"] = features[index].pop(layer_name)
    todo = sorted(
        (i for i in range(len(rows)) if i not in features or (layer_name and "prior_hidden" not in features[i])),
        key=lambda i: len(rows[i]["response"]),
    )
    for start in tqdm(range(0, len(todo), batch_size), desc=desc, unit="batch", disable=not todo):
        batch = todo[start : start + batch_size]
        for index, encoded in zip(batch, _encode_batch(classifier, base, [rows[i] for i in batch]), strict=True):
            features[index] = {**encoded, **features.get(index, {})}  # a cached row only gains the layer's states
            _store(cache, keys[index], features[index], layer_name)
    if candidates:
        unranked = [
            i for i in range(len(rows)) if features[i].get("candidates", torch.empty(0, 0)).shape[-1] != candidates
        ]
        for index in tqdm(unranked, desc="Ranking base candidates", unit="resp", disable=not unranked):
            feature = features[index]
            ranked = classifier.base_candidates(feature["hidden"], feature["next_ids"], candidates)
            feature.update(candidates=ranked[0].int(), candidate_log_lm=ranked[1].half(), next_log_lm=ranked[2].float())
            _store(cache, keys[index], feature, layer_name)
    return [_as_the_prior_reads(classifier, features[index]) for index in range(len(rows))]


def _as_the_prior_reads(classifier: PreferenceClassifier, feature: Features) -> Features:
    """One response's features with its prior-layer states as the prior reads them (``prior_states``): the
    cache keeps the states themselves, so one cache serves priors that pool and priors that do not."""
    if "prior_hidden" not in feature or classifier.config.prior_pooling == "last":
        return feature
    return {**feature, "prior_hidden": classifier.prior_states(feature["prior_hidden"].float()).half()}


def teach_rows(
    classifier: PreferenceClassifier,
    base: LoadedModel,
    rows: list[dict],
    features: list[Features],
    cache: Path | None,
    teacher_classes: tuple[str, ...],
    teacher_answers: str = "axis",
    batch_size: int = 8,
) -> None:
    """Add ``teacher.<class>`` to the features (from ``encode_rows``, with candidates) of the rows on the
    teacher classes' axes (``teacher_answers="all"``: of every row): the candidates' log-probs with the
    class's request in the prompt (``TrainConfig.teacher_classes``), kept in the same cache files."""
    keys = _feature_keys(classifier, base, rows)
    layer_name = _layer_name(classifier)
    for name in teacher_classes:
        untaught = [
            i
            for i in sorted(range(len(rows)), key=lambda i: len(rows[i]["response"]))
            if _taught_by_teacher(rows[i], teacher_classes, teacher_answers) and f"teacher.{name}" not in features[i]
        ]
        for start in tqdm(
            range(0, len(untaught), batch_size), desc=f"Teacher: {name}", unit="batch", disable=not untaught
        ):
            batch = untaught[start : start + batch_size]
            taught = _teacher_batch(classifier, base, [rows[i] for i in batch], [features[i] for i in batch], name)
            for index, log_lm in zip(batch, taught, strict=True):
                features[index][f"teacher.{name}"] = log_lm
                _store(cache, keys[index], features[index], layer_name)


def _taught_by_teacher(row: dict, teacher_classes: tuple[str, ...], teacher_answers: str) -> bool:
    """Whether the teacher reads this answer: every answer, or those on the teacher classes' axes, and
    always one written with no request (``UNREQUESTED``: the teacher is all it is read by)."""
    if teacher_answers == "all" or row["class"] == UNREQUESTED:
        return True
    return axis_of(row["class"]) in {axis_of(name) for name in teacher_classes}


def _layer_name(classifier: PreferenceClassifier) -> str | None:
    """The cache name of the states of the layer the prior reads (None: it reads the final states)."""
    return None if classifier.config.prior_layer is None else f"hidden.{classifier.config.prior_layer}"


def _feature_keys(classifier: PreferenceClassifier, base: LoadedModel, rows: list[dict]) -> list[str]:
    """Each row's feature-cache file name: its text, the backbone that encodes it and the base model that
    ranks its candidates, with the dtypes they run in. Float32, the dtype every cached feature so far was
    encoded in, adds nothing, so those keys hold."""
    identity = [classifier.config.kind, classifier.config.backbone, base.name]
    dtypes = [str(model.dtype).removeprefix("torch.") for model in (classifier.backbone, base.model)]
    if dtypes != ["float32", "float32"]:
        identity.append(dtypes)
    return [
        hashlib.sha256(
            json.dumps([instruction_text(row), row["response"], bool(row.get("truncated")), identity]).encode()
        ).hexdigest()[:32]
        for row in rows
    ]


def _store(cache: Path | None, key: str, feature: Features, layer_name: str | None) -> None:
    if cache is not None:
        named = {layer_name if name == "prior_hidden" else name: tensor for name, tensor in feature.items()}
        save_file({name: tensor.contiguous() for name, tensor in named.items()}, cache / f"{key}.safetensors")


def assemble(
    features: list[Features],
    rows: list[dict],
    classes: tuple[str, ...],
    teacher_classes: tuple[str, ...] = (),
    teacher_answers: str = "axis",
) -> EncodedSet:
    """Stack per-response features into one training set labelled with each response's class (``UNLABELLED``
    for one written with no request); the teacher's targets only for the answers ``teacher_answers`` names
    (a shared cache may hold more)."""
    labels = [UNLABELLED if row["class"] == UNREQUESTED else classes.index(row["class"]) for row in rows]
    lengths = torch.tensor([len(feature["next_ids"]) for feature in features])
    names = [name for name in (*STATES, "next_ids", *BAYES_FEATURES) if all(name in f for f in features)]
    teacher = (
        torch.cat([_taught(f, r, teacher_classes, teacher_answers) for f, r in zip(features, rows, strict=True)])
        if teacher_classes
        else None
    )
    return EncodedSet(
        {name: torch.cat([feature[name] for feature in features]) for name in names},
        torch.repeat_interleave(torch.tensor(labels), lengths),
        torch.repeat_interleave(torch.arange(len(rows)), lengths),
        torch.tensor(labels),
        teacher,
        teacher_classes,
    )


def _taught(feature: Features, row: dict, teacher_classes: tuple[str, ...], teacher_answers: str) -> torch.Tensor:
    """One response's teacher log-probs [T, k, C], NaN for a class the teacher did not read it under."""
    untaught = torch.full(feature["candidate_log_lm"].shape, float("nan"), dtype=torch.float16)
    read = _taught_by_teacher(row, teacher_classes, teacher_answers)
    return torch.stack(
        [feature.get(f"teacher.{name}", untaught).half() if read else untaught for name in teacher_classes], dim=-1
    )


def teacher_divergence(
    classifier: PreferenceClassifier | None,
    features: dict[str, torch.Tensor],
    teacher: torch.Tensor,
    teacher_classes: tuple[str, ...],
) -> tuple[torch.Tensor, int]:
    """KL(prompted base model || head) over the candidates: the prompted model's candidate distribution
    (renormalised over them) against the head's p(x | prefix, c), summed over the (row, teacher class)
    pairs the teacher read, and how many there were. With ``classifier`` None, against the base model's
    own candidate distribution: what a head that moves nothing scores (how far the prompt moves it)."""
    taught = ~teacher[:, 0, :].isnan()  # [N, C]
    rows = taught.any(-1)
    if not rows.any():
        return teacher.new_zeros((), dtype=torch.float32), 0
    candidate_log_lm = features["candidate_log_lm"][rows].float()
    if classifier is None:
        conditional = torch.log_softmax(candidate_log_lm, dim=-1).unsqueeze(-1)  # [n, k, 1]
    else:
        class_index = torch.tensor([classifier.classes.index(name) for name in teacher_classes])
        conditional = classifier.candidate_log_likelihoods(
            features["hidden"][rows], features["candidates"][rows], candidate_log_lm
        )[..., class_index]  # [n, k, C]
    target = torch.log_softmax(teacher[rows].float().nan_to_num(0.0), dim=-2)
    divergence = (target.exp() * (target - conditional)).sum(-2)  # [n, C]
    return divergence[taught[rows]].sum(), int(taught.sum())


@torch.no_grad()
def _mean_teacher_divergence(classifier: PreferenceClassifier | None, data: EncodedSet, chunk: int = 2048) -> float:
    total, count = 0.0, 0
    for start in range(0, len(data.labels), chunk):
        rows = slice(start, start + chunk)
        summed, taught = teacher_divergence(classifier, data.select(rows), data.teacher[rows], data.teacher_classes)
        total, count = total + summed.item(), count + taught
    return total / max(count, 1)


@torch.no_grad()
def read_classes(classifier: PreferenceClassifier, data: EncodedSet) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's class log-probs [N, K] and their sum over each response's tokens [R, K]: what a
    response is read as (response accuracy takes the class of the highest mean, i.e. sum / tokens)."""
    log_probs = torch.cat(
        [classifier.token_log_probs(**data.select(slice(i, i + 4096))) for i in range(0, len(data.labels), 4096)]
    )
    return log_probs, data.sum_per_response(log_probs)


def evaluate(classifier: PreferenceClassifier, data: EncodedSet, classes: tuple[str, ...]) -> dict:
    """Token- and response-level accuracy, 6-way and per axis (own pole vs the opposite pole)."""
    log_probs, sums = read_classes(classifier, data)
    loss = functional.nll_loss(log_probs, data.labels).item()
    counts = data.response_lengths().clamp(min=1)
    response_scores = sums / counts[:, None]
    metrics: dict = {
        "loss": loss,
        "response_loss": functional.nll_loss(classifier.normalize(sums), data.response_labels).item(),
        "token_accuracy": (log_probs.argmax(-1) == data.labels).float().mean().item(),
        **(
            {
                "teacher_kl": _mean_teacher_divergence(classifier, data),
                "teacher_kl_base": _mean_teacher_divergence(None, data),
            }
            if data.teacher is not None
            else {}
        ),
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


def train_classifier(base: LoadedModel, config: TrainConfig, backbone: LoadedModel | None = None) -> dict:
    """Train, early-stop on validation loss, save the best head and a metrics JSON; return the metrics.

    With ``backbone``, the classifier reads that model's hidden states (``kind: separate``) instead of the
    base model's. A background class with no rows in the data is left out (an untrained class would
    compete in every posterior)."""
    torch.manual_seed(config.seed)
    prior_on = _prior_on_folder(config.prior_on, base) if config.prior_on else None
    rows, dropped = load_rows(config.data, config.classes)
    unrequested = [row for row in rows if row["class"] == UNREQUESTED]
    rows = [row for row in rows if row["class"] != UNREQUESTED]
    present = {row["class"] for row in rows}
    classes = tuple(name for name in config.classes if name not in BACKGROUND_CLASSES or name in present)
    train_rows, all_val_rows = split_by_instruction(rows, config.val_fraction, config.seed)
    val_rows = all_val_rows
    if config.contrast_filter:
        train_rows, uncontrasted = keep_contrasting(train_rows, config.pole_limits)
        val_rows, val_uncontrasted = keep_contrasting(all_val_rows)
        dropped.update({f"uncontrasted_{axis}": n for axis, n in (uncontrasted + val_uncontrasted).items()})
    if config.epochs and not train_rows:
        raise ValueError(f"No answers left to train on after the split and the filters ({dict(dropped)} dropped)")
    classifier = PreferenceClassifier.create(
        base,
        list(classes),
        kind="shared" if backbone is None else "separate",
        backbone=backbone,
        head_size=config.head_size,
        seed=config.seed,
        form=config.form,
        class_prior=config.class_prior,
        posterior=config.posterior,
        guidance_prior=config.guidance_prior,
        prior_layer=config.prior_layer,
        shift_rank=config.shift_rank,
        prior_pooling=config.prior_pooling,
    )
    trainable = (
        _prior_on(classifier, prior_on, base, config.head_parts_from, config.main_guided_classes)
        if prior_on
        else classifier.head.parameters()
    )
    if config.prior_from is not None:
        _start_prior_from(classifier, _prior_on_folder(config.prior_from, base), base)
    candidates = config.candidates if classifier.config.form == "bayes" else 0
    teacher = config.teacher_classes
    # answers written with no request teach only through the teacher, and only on the training side
    taught_alone = split_by_instruction(unrequested, config.val_fraction, config.seed)[0] if teacher else []
    if unread := len(unrequested) - len(taught_alone):
        dropped["unrequested_unread"] = unread
    # at 0 epochs nothing trains (the head and prior are other runs'): only the validation answers are read
    fitted_rows = train_rows + taught_alone if config.epochs else []
    features = encode_rows(classifier, base, fitted_rows + all_val_rows, config.feature_cache, candidates=candidates)
    all_val_features = features[len(fitted_rows) :]
    kept = {id(row) for row in val_rows}
    val_features = [f for f, row in zip(all_val_features, all_val_rows, strict=True) if id(row) in kept]
    if teacher:
        taught_rows, taught_features = fitted_rows + val_rows, features[: len(fitted_rows)] + val_features
        teach_rows(
            classifier, base, taught_rows, taught_features, config.feature_cache, teacher, config.teacher_answers
        )
    val = assemble(val_features, val_rows, classes, teacher, config.teacher_answers)
    train = None
    if fitted_rows:
        train = assemble(features[: len(fitted_rows)], fitted_rows, classes, teacher, config.teacher_answers)
    history = _fit(classifier, trainable, train, val, classes, config) if train is not None else []
    classifier.head.eval()
    labelled = train  # what the training figures read: the answers with a class
    if train is not None and taught_alone:
        labelled = assemble(features[: len(train_rows)], train_rows, classes, teacher, config.teacher_answers)
    metrics = {
        "train": evaluate(classifier, labelled, classes) if labelled is not None else None,
        "validation": evaluate(classifier, val, classes),
        "validation_by_model": _by_model(classifier, val_features, val_rows, classes),
        "validation_unfiltered": evaluate(classifier, assemble(all_val_features, all_val_rows, classes), classes),
        "validation_unfiltered_by_model": _by_model(classifier, all_val_features, all_val_rows, classes),
        "data": {
            "files": [str(path) for path in config.data],
            "responses": len(rows),
            "refusals_dropped": dropped.pop("refusals", 0),
            "degenerate_dropped": dropped.pop("degenerate", 0),
            **{f"{reason}_dropped": n for reason, n in sorted(dropped.items())},
            "train_responses": len(train_rows),
            "train_unrequested_responses": len(taught_alone) if config.epochs else 0,
            "validation_responses": len(val_rows),
            "train_instructions": len({r["id"] for r in train_rows}),
            "validation_instructions": len({r["id"] for r in val_rows}),
            "train_tokens": len(train.labels) if train is not None else None,
            "per_class": _count_by_class(train_rows + val_rows),
        },
        "history": history,
        "config": {  # as JSON holds it: paths as strings, tuples as lists
            k: json.loads(json.dumps(v, default=str))
            for k, v in asdict(config).items()
            if k not in ("data", "output", "feature_cache")
        },
    }
    classifier.save(config.output)
    (Path(config.output) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _fit(
    classifier: PreferenceClassifier,
    trainable: Iterable[torch.nn.Parameter],
    train: EncodedSet,
    val: EncodedSet,
    classes: tuple[str, ...],
    config: TrainConfig,
) -> list[dict]:
    """Train what ``trainable`` holds, early-stopping on the validation loss; leave the best epoch's head in
    ``classifier`` and return each epoch's validation figures."""
    head = classifier.head
    # Balance classes by token count, so long answers do not drown short ones.
    labels, response_labels = (kept[kept != UNLABELLED] for kept in (train.labels, train.response_labels))
    class_tokens = torch.bincount(labels, minlength=len(classes)).float().clamp(min=1)
    class_weight = class_tokens.sum() / (len(classes) * class_tokens)
    response_counts = torch.bincount(response_labels, minlength=len(classes)).float().clamp(min=1)
    response_class_weight = response_counts.sum() / (len(classes) * response_counts)
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    best, best_state, stale, history = float("inf"), None, 0, []
    generator = torch.Generator().manual_seed(config.seed)
    for epoch in (bar := tqdm(range(config.epochs), desc="Training", unit="epoch")):
        head.train()
        if config.response_weight:
            batches = _response_batches(train, config.batch_size, generator)
        else:
            batches = torch.randperm(len(train.labels), generator=generator).split(config.batch_size)
        for batch in batches:
            picked = train.select(batch)
            for name in STATES:
                if name in picked:
                    picked[name] = functional.dropout(picked[name], config.dropout, training=True)
            token_log_probs, loss = _token_loss(
                classifier, picked, train.labels[batch], class_weight, config.generative_weight
            )
            if train.teacher is not None:
                summed, taught = teacher_divergence(classifier, picked, train.teacher[batch], config.teacher_classes)
                loss = loss + config.teacher_weight * summed / max(taught, 1)
            if config.response_weight:
                responses, local = train.response[batch].unique_consecutive(return_inverse=True)
                sums = token_log_probs.new_zeros(len(responses), len(classes)).index_add(0, local, token_log_probs)
                response_loss = functional.nll_loss(
                    classifier.normalize(sums), train.response_labels[responses], weight=response_class_weight
                )
                loss = (1 - config.response_weight) * loss + config.response_weight * response_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        head.eval()
        val_metrics = evaluate(classifier, val, classes)
        val_metrics["loss"] += config.response_weight * val_metrics["response_loss"]
        val_metrics["loss"] += config.teacher_weight * val_metrics.get("teacher_kl", 0.0)
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
    return history


def _prior_on_folder(spec: Path, base: LoadedModel) -> Path:
    """The folder ``--prior-on`` names: as given, or for "default" the classifier packaged for ``base``."""
    if str(spec) != DEFAULT_CLASSIFIER:
        return spec
    if (folder := default_classifier_path(base)) is None:
        raise ModelResolutionError(f"No classifier ships with the package for {base.name}")
    return folder


def _prior_on(
    classifier: PreferenceClassifier,
    folder: Path,
    base: LoadedModel,
    parts_from: Sequence[tuple[Sequence[str], Path]] = (),
    main_guided: Sequence[str] = (),
) -> list[torch.nn.Parameter]:
    """Copy a trained bayes head that guides with a uniform prior into ``classifier`` and freeze it;
    return the prior's parameters, the only ones left to train.

    The head may carry a reading-only prior already (such as the shipped default): it is left behind
    and a new one is fitted, so a prior can be refitted on grown data without the head's own run. With
    ``parts_from``, the classes named there are scored by those classifiers' heads (``compose``), and
    ``classifier``'s posterior may differ from the head's; ``main_guided`` parts' classes keep the main
    head's posterior. Its per-class settings (weight factors,
    plausibility floors, classes sparing the favourite) carry over for the classes whose guidance stays
    exactly the head's: they were probed for that guidance."""
    original = trained = PreferenceClassifier.load(folder, base)
    if parts_from or main_guided:
        donors = [(list(names), PreferenceClassifier.load(path, base)) for names, path in parts_from]
        trained = compose(trained, donors, posterior=classifier.config.posterior, main_guided=main_guided)
    wanted = {
        "form": "bayes",
        "posterior": classifier.config.posterior,
        "head_size": classifier.config.head_size,
        "shift_rank": classifier.config.shift_rank,
        "classes": classifier.classes,
    }
    _require_settings(trained, wanted, "--prior-on", folder)
    if trained.guides_with_prior:
        raise ValueError(f"--prior-on needs a head that guides with a uniform prior; {folder}'s prior guides")
    if trained.config.head_parts:
        classifier.set_head_parts(trained.config.head_parts, trained.config.main_guided_classes)
    likelihood = {name: tensor for name, tensor in trained.head.state_dict().items() if not name.startswith("prior.")}
    classifier.head.load_state_dict(likelihood, strict=False)  # all but the prior
    # The per-class settings probed for the head's guidance hold where that guidance stays exactly the
    # head's: the floors and the guard's sparing are part of guidance, so they are copied before the comparison.
    guidance_settings = (
        "plausibility_floors",
        "unprompted_plausibility_floors",
        "prompted_plausibility_floors",
        "unprompted_favourite_ngrams",
        "prompted_favourite_ngrams",
    )
    for settings in guidance_settings:
        setattr(classifier.config, settings, dict(getattr(original.config, settings)))
    kept = {n for n in classifier.classes if classifier.guidance_digest([n]) == original.guidance_digest([n])}
    for settings in ("prompted_weight_factors", "unprompted_weight_factors", *guidance_settings):
        values = getattr(original.config, settings)
        setattr(classifier.config, settings, {name: value for name, value in values.items() if name in kept})
    for name, parameter in classifier.head.named_parameters():
        parameter.requires_grad_(name.startswith("prior."))
    return list(classifier.head.prior.parameters())


def _start_prior_from(classifier: PreferenceClassifier, folder: Path, base: LoadedModel) -> None:
    """Copy the learned prior of the classifier in ``folder`` into ``classifier``: same classes, layer and size."""
    donor = PreferenceClassifier.load(folder, base)
    wanted = {
        "class_prior": "learned",
        "classes": classifier.classes,
        "prior_layer": classifier.config.prior_layer,
        "prior_pooling": classifier.config.prior_pooling,
        "head_size": classifier.config.head_size,
    }
    _require_settings(donor, wanted, "--prior-from", folder)
    classifier.head.prior.load_state_dict(donor.head.prior.state_dict())


def _require_settings(classifier: PreferenceClassifier, wanted: dict, option: str, folder: Path) -> None:
    """Refuse a saved classifier whose config differs from ``wanted`` where ``option`` needs them alike."""
    found = {name: getattr(classifier.config, name) for name in wanted}
    if mismatch := {name: value for name, value in found.items() if value != wanted[name]}:
        raise ValueError(f"{option} needs a classifier with {wanted}; {folder} has {mismatch}")


def _response_batches(data: EncodedSet, size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Row indices of whole responses in a seeded random order, about ``size`` rows per batch: a
    response-level term needs every token of a response in the same batch (without one, batches are
    random positions, which mix more responses per step)."""
    lengths = data.response_lengths()
    starts = lengths.cumsum(0) - lengths
    batches, current, filled = [], [], 0
    for response in torch.randperm(len(lengths), generator=generator).tolist():
        current.append(torch.arange(starts[response], starts[response] + lengths[response]))
        filled += int(lengths[response])
        if filled >= size:
            batches.append(torch.cat(current))
            current, filled = [], 0
    if current:
        batches.append(torch.cat(current))
    return batches


def _token_loss(
    classifier: PreferenceClassifier,
    features: dict[str, torch.Tensor],
    labels: torch.Tensor,
    class_weight: torch.Tensor,
    generative_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens' class log-probs and the token-level loss: class cross-entropy for the observed tokens;
    the bayes form adds the class-conditional next-token loss of the response's own class (both weighted
    by class, so long answers do not drown short ones)."""
    if classifier.config.form == "direct":
        log_probs = classifier.token_log_probs(**features)
        return log_probs, functional.nll_loss(log_probs, labels, weight=class_weight)
    likelihood_inputs = {name: tensor for name, tensor in features.items() if name != "prior_hidden"}
    conditional = classifier.token_log_likelihoods(**likelihood_inputs)
    log_prior = classifier.reading_log_prior(features["hidden"], features.get("prior_hidden"))
    log_probs = classifier.posterior(conditional, log_prior)
    discriminative = functional.nll_loss(log_probs, labels, weight=class_weight)
    generative = functional.nll_loss(conditional[..., : len(classifier.classes)], labels, weight=class_weight)
    return log_probs, (1 - generative_weight) * discriminative + generative_weight * generative


def _by_model(
    classifier: PreferenceClassifier, features: list[Features], rows: list[dict], classes: tuple[str, ...]
) -> dict[str, dict]:
    """Validation metrics on each generating model's text alone: the classifier guides the base model,
    so its own text is the score that matters when training text comes from several models."""
    by_model: dict[str, dict] = {}
    for model in sorted({row.get("model", "unknown") for row in rows}):
        chosen = [index for index, row in enumerate(rows) if row.get("model", "unknown") == model]
        subset = assemble([features[i] for i in chosen], [rows[i] for i in chosen], classes)
        by_model[model] = evaluate(classifier, subset, classes)
    return by_model


def _count_by_class(rows: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[row["class"]] += 1
    return dict(counts)
