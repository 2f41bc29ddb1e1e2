"""The token-level preference classifier: log p_cls(c | prefix, x) for candidate next tokens x.

One head, two sources of the prefix's hidden state:

* ``shared``: the base model's own final hidden state, tapped from the forward pass that decoding
  already runs, so no second transformer runs (the fast path);
* ``separate``: any Hugging Face causal LM that shares the base model's tokenizer (the paper's setup:
  a small model steering a large one), run incrementally on exactly the tokens being generated.

The head combines the prefix state h with the candidate's input embedding e(x) into one score per
class, s(h, x) = W_out · LayerNorm(GELU(W_h h + W_e e(x) + b)). With ``shift_rank`` r > 0 it adds a
low-rank bilinear term, s_c(h, x) += (A_c h + a_c) · (B e(x)) with A_c: H → r, B: E → r. The MLP sums h's
and x's projections before one nonlinearity, so it tells candidates apart mostly by the same few
directions at every step; a prompt's effect on the next token is a shift of the final state, δ_c(h),
whose change to the logits is δ_c(h) · e_out(x), a dot product with the candidate (exactly so where
input and output embeddings are tied, as in the embedded model). The bilinear term is that shift,
learned in r dimensions; it starts at zero (A = 0), so training starts from the MLP alone.
The scores are read in one of two forms:

* ``direct``: log p_cls(· | prefix, x) = log_softmax_c s(h, x);
* ``bayes``: s_c scores how much class c raises candidate x above the base model, so that over the
  candidate set X (the base model's top-k), p(x | prefix, c) = p_LM(x) e^{s_c(h,x)} / Σ_{x'∈X} p_LM(x')
  e^{s_c(h,x')}, and Bayes' rule with a uniform class prior gives
  log p_cls(c | prefix, x) = log_softmax_c log p(x | prefix, c). A class's score can then only be earned
  by telling candidates apart, which is what guidance needs (the direct form, trained on one observed
  token per position, mostly learns which class the *prefix* is, and barely reorders candidates).
  With ``class_prior: learned`` the prior is not uniform but a second small MLP's p(c | prefix), so
  log p_cls(c | prefix, x) = log_softmax_c [log p(c | prefix) + log p(x | prefix, c)]: the exact Bayes
  factorisation of the class of the text continued by x. The prior adds what the prefix already says
  about the class (what the direct form is good at) and, at decoding, eases guidance towards a class
  the text already clearly shows while pushing harder where it does not. With ``guidance_prior:
  uniform`` decoding leaves the learned prior out (each candidate is scored by the likelihood ratio
  alone, as without a prior) while reading a text (``sequence_log_probs``) keeps it: the prior can then
  be fitted on top of a trained head (``cliper train --prior-on``) to read styles better without
  changing how guidance steers. Such a reading-only prior may read another layer of the backbone
  (``prior_layer``): a middle layer holds more of what a text says and less of what comes next, and
  the mean of its states over the answer so far (``prior_pooling``) more than any one position's.

With ``head_parts`` the likelihoods s_c come from several such heads, each scoring its own classes
(``ComposedHead``; ``compose`` builds one from trained heads), so one axis can be given a head trained
for it without moving how the others score theirs.

Either form normalises each class's posterior over every class (``posterior: joint``) or, with
``posterior: axis``, over its own preference axis and the background classes only (``normalizer``):
the axes are independent, so two requested classes on different axes then do not compete. With head
parts, ``part`` normalises each class over its own part's classes, and ``main-joint`` keeps the main
head's posterior exactly as that head was trained (jointly over all of its own rows, including its
scores of the parts' classes) while each part's classes are normalised over their part: the main
classes then guide exactly as the main head alone does. A part's class may guide so too
(``main_guided_classes``) while its part still reads it and guides the part's other classes: a head
joins for one pole of an axis and leaves the other pole's guidance as it was.

Saved as ``classifier.safetensors`` (head only) plus ``classifier.json`` (config); never pickle.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import threading
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field, model_validator
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from cliper_integrations.core.errors import ModelResolutionError, VocabularyMismatchError
from cliper_integrations.core.models import LoadedModel, load_model
from cliper_integrations.core.preferences import BACKGROUND_CLASSES, opposite

CONFIG_FILE = "classifier.json"
WEIGHTS_FILE = "classifier.safetensors"


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """SHA-256 of the token -> id mapping: equal fingerprints mean token ids mean the same thing."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


class ClassifierConfig(BaseModel):
    """Everything needed to rebuild a classifier next to its safetensors weights."""

    kind: Literal["shared", "separate"]
    classes: list[str] = Field(min_length=2)
    hidden_size: int
    embedding_size: int
    head_size: int = 256
    shift_rank: int = Field(default=0, ge=0)
    """Rank of the bilinear shift term (0: the MLP alone); see the module docstring."""
    tokenizer_fingerprint: str
    backbone: str | None = Field(default=None, description="model spec of a separate backbone")
    base_model: str | None = Field(default=None, description="name of the model it was trained to steer")
    form: Literal["direct", "bayes"] = "direct"
    class_prior: Literal["uniform", "learned"] = "uniform"
    """Bayes form only: the class prior p(c | prefix) in Bayes' rule."""
    guidance_prior: Literal["learned", "uniform"] = "learned"
    """With a learned prior: whether decoding uses it too, or scores candidates with a uniform prior."""
    posterior: Literal["joint", "axis", "part", "main-joint"] = "joint"
    """What each class's posterior is normalised over: every class, its own axis, the classes of its own
    head part, or (``main-joint``) its own part for a part's classes and, for the main head's classes, every
    row of the main head, which keeps scoring the parts' classes for that alone (``normalizer``)."""
    prior_layer: int | None = Field(default=None, ge=0)
    """The backbone layer (an index into its ``hidden_states``) the learned prior reads; None: the final
    state, as the likelihood head. Reading only: decoding taps the final state alone."""
    prior_pooling: Literal["last", "mean"] = "last"
    """What of ``prior_layer``'s states the prior reads at a position: the position's own state, or
    (``mean``) the mean of the answer's states up to it. A style shows across a whole answer, and one
    position's state holds mostly what comes next; the running mean is still a function of the prefix
    alone, so the prior stays p(c | prefix)."""
    head_parts: list[list[str]] = Field(default_factory=list)
    """Classes whose likelihoods come from heads of their own (each part one MLP; the classes no part
    names share the first, main head). Empty: one head scores every class. See ``ComposedHead``."""
    main_guided_classes: list[str] = Field(default_factory=list)
    """``main-joint`` only: parts' classes that guide by the main head's posterior (its score of the
    class, against every row of the main head), while their part still scores them for the part's other
    classes and for reading: a head can join for one pole of an axis, telling it from the other pole,
    leave that pole guiding exactly as before, and read the axis with both poles' scores from one head."""
    prompted_weight_factors: dict[str, float] = Field(default_factory=dict)
    """Per class, what a weight from memory is multiplied by when the request is also written into the
    prompt (``preference_prompt``): the prompt already moves the answer part of the way, and full
    guidance on top overshoots at a cost in fluency. Measured per classifier on training-side prompts
    (``benchmarks/steering_probe.py --setting prompt+guidance``); a class not named keeps its weight."""
    plausibility_floors: dict[str, float] = Field(default_factory=dict)
    """Per class, the least plausibility floor guidance towards it decodes under (``guided_plausibility``
    of ``CLIPerEngine``; a row's floor is the largest of the engine's and its weighted classes' floors):
    a class whose push costs more fluency than the others' keeps to what the base model finds more
    plausible. Holds in both settings (a floor for one only: ``unprompted_plausibility_floors``,
    ``prompted_plausibility_floors``). Measured per classifier on training-side prompts; a class not named
    takes the engine's."""
    unprompted_weight_factors: dict[str, float] = Field(default_factory=dict)
    """Per class, what a weight from memory is multiplied by when the request is not in the prompt
    (guidance alone): a class whose guidance needs a stronger push than memory's scale gives to reach what
    its users ask for. Measured per classifier on training-side prompts; a class not named keeps its weight."""
    unprompted_favourite_ngrams: dict[str, int | None] = Field(default_factory=dict)
    """Per class, with guidance alone, the n the loop guard holds the base model's own favourite token to
    on that class's rows (``favourite_ngrams`` of ``ClassifierGuidedLogitsProcessor``): null, never
    banned, so the guard stops only the loops guidance leads into, at less fluency cost; n, banned only
    when it would repeat an n-gram. A row takes its classes' rule only when every class it weighs is
    named (the strictest of theirs), else the guard's own. Measured per classifier on training-side prompts."""
    prompted_favourite_ngrams: dict[str, int | None] = Field(default_factory=dict)
    """The same, with the request also in the prompt (``preference_prompt``)."""
    unprompted_plausibility_floors: dict[str, float] = Field(default_factory=dict)
    """Per class, a floor as ``plausibility_floors`` that holds with guidance alone only: the push that
    must do the whole job alone may need a stricter floor than the one that only tops up the prompt.
    Where both name a class, the larger holds."""
    prompted_plausibility_floors: dict[str, float] = Field(default_factory=dict)
    """The same, with the request also in the prompt (``preference_prompt``) only."""
    unprompted_opposite_factors: dict[str, float] = Field(default_factory=dict)
    """Per class, with guidance alone, how much guidance towards it also steers away from the other pole of
    its axis: at weight α and factor γ the other pole is weighed −γ·α, so a candidate scores
    α·log p_cls(c | x) − γα·log p_cls(c̄ | x); at γ = 1 that is α times the log-ratio of the two poles'
    likelihoods, whose normaliser cancels. The joint posterior alone penalises a candidate the other pole
    favours only through its normaliser, by about p_cls(c̄ | x) per unit of the other pole's score. A row
    that weighs both poles itself keeps its own weights. Measured per classifier on training-side prompts."""
    prompted_opposite_factors: dict[str, float] = Field(default_factory=dict)
    """The same, with the request also in the prompt (``preference_prompt``)."""
    unprompted_ending_opposite_factors: dict[str, float] = Field(default_factory=dict)
    """Per class, with guidance alone, how much guidance towards it weighs the other pole of its axis against
    ending the answer only: at weight α and factor γ the end-of-turn tokens score −γα · log p_cls(c̄ | end)
    against the written tokens' expected −γα · log p_cls(c̄ | x) (``ending_weights`` of
    ``ClassifierGuidedLogitsProcessor``), and the written tokens keep the order guidance gives them. For a
    class whose other pole knows when answers end better than it does. Measured per classifier on
    training-side prompts."""
    prompted_ending_opposite_factors: dict[str, float] = Field(default_factory=dict)
    """The same, with the request also in the prompt (``preference_prompt``)."""
    format_version: int = 1

    @model_validator(mode="after")
    def _prior_layer_reads_only(self) -> ClassifierConfig:
        if self.prior_layer is not None and (self.class_prior != "learned" or self.guidance_prior != "uniform"):
            raise ValueError("prior_layer needs a learned prior that decoding leaves out (guidance_prior: uniform)")
        if self.prior_pooling != "last" and self.prior_layer is None:
            raise ValueError("prior_pooling 'mean' pools a reading-only prior's layer: it needs prior_layer")
        return self

    @model_validator(mode="after")
    def _parts_of_own_classes(self) -> ClassifierConfig:
        named = [name for part in self.head_parts for name in part]
        if len(named) != len(set(named)) or not set(named) <= set(self.classes) or any(not p for p in self.head_parts):
            raise ValueError(f"head_parts must be disjoint, non-empty groups of the classes, got {self.head_parts!r}")
        if self.head_parts and set(named) == set(self.classes):
            raise ValueError("head_parts must leave the main head some classes (those no part names)")
        if self.main_guided_classes and (
            self.posterior != "main-joint" or not set(self.main_guided_classes) <= set(named)
        ):
            raise ValueError(
                f"main_guided_classes must be head parts' classes under posterior main-joint, got "
                f"{self.main_guided_classes!r} ({self.posterior}, parts {self.head_parts!r})"
            )
        background = {name for name in self.classes if name in BACKGROUND_CLASSES}
        if self.posterior in ("part", "main-joint") and (
            alone := [part for part in self.head_parts if len(set(part) | background) < 2]
        ):
            raise ValueError(
                f"posterior {self.posterior}: head part {alone[0]!r} has no class to be told apart from "
                "(give it both poles, or train a background class)"
            )
        return self

    @property
    def part_classes(self) -> list[list[str]]:
        """The classes each head scores, the main head first (one group when there are no parts)."""
        named = {name for part in self.head_parts for name in part}
        return [[name for name in self.classes if name not in named], *self.head_parts]

    @property
    def shadowed_classes(self) -> list[str]:
        """The parts' classes whose main-head scores are kept beside the parts' own (``main-joint``), in
        class order: extra score columns that only the main classes' posterior reads."""
        main = set(self.part_classes[0])
        return [name for name in self.classes if name not in main] if self.posterior == "main-joint" else []

    @model_validator(mode="after")
    def _per_class_settings_of_own_classes(self) -> ClassifierConfig:
        factor, floor = (lambda v: v >= 0, ">= 0"), (lambda v: 0 < v <= 1, "in (0, 1]")
        per_class = {
            "prompted_weight_factors": (self.prompted_weight_factors, *factor),
            "plausibility_floors": (self.plausibility_floors, *floor),
            "unprompted_plausibility_floors": (self.unprompted_plausibility_floors, *floor),
            "prompted_plausibility_floors": (self.prompted_plausibility_floors, *floor),
            "unprompted_weight_factors": (self.unprompted_weight_factors, *factor),
            "unprompted_opposite_factors": (self.unprompted_opposite_factors, *factor),
            "prompted_opposite_factors": (self.prompted_opposite_factors, *factor),
            "unprompted_ending_opposite_factors": (self.unprompted_ending_opposite_factors, *factor),
            "prompted_ending_opposite_factors": (self.prompted_ending_opposite_factors, *factor),
        }
        named = {field_name: list(values) for field_name, (values, _, _) in per_class.items()}
        guards = {
            "unprompted_favourite_ngrams": self.unprompted_favourite_ngrams,
            "prompted_favourite_ngrams": self.prompted_favourite_ngrams,
        }
        for field_name, names in {**named, **guards}.items():
            if unknown := [name for name in names if name not in self.classes]:
                raise ValueError(f"{field_name} names {unknown[0]!r}, which is not one of the classes")
        for field_name, (values, valid, bounds) in per_class.items():
            for name, value in values.items():
                if not (math.isfinite(value) and valid(value)):
                    raise ValueError(f"{field_name}[{name!r}] must be finite and {bounds}, got {value!r}")
        for field_name, values in guards.items():
            if short := {name: n for name, n in values.items() if n is not None and n < 2}:
                raise ValueError(f"{field_name} must be null or at least 2, got {short}")
        return self

    def setting_floors(self, prompted: bool) -> dict[str, float]:
        """Per class, the classifier's floor for guidance towards it in one setting: the larger of
        ``plausibility_floors`` (both settings) and the setting's own (``prompted_plausibility_floors`` or
        ``unprompted_plausibility_floors``); a class not named has none, so the engine's holds."""
        own = self.prompted_plausibility_floors if prompted else self.unprompted_plausibility_floors
        both = (self.plausibility_floors, own)
        return {name: max(f[name] for f in both if name in f) for name in self.classes if any(name in f for f in both)}

    def plausibility_floor(self, classes: Sequence[str], engine_floor: float | None, prompted: bool) -> float | None:
        """The floor guidance towards ``classes`` decodes under in one setting: the largest of
        ``engine_floor`` and those classes' own (``setting_floors``; None: no floor at all)."""
        own = self.setting_floors(prompted)
        floors = [own[name] for name in classes if name in own]
        floors += [engine_floor] if engine_floor is not None else []
        return max(floors, default=None)

    def opposite_weights(self, weights: Mapping[str, float], prompted: bool) -> dict[str, float]:
        """``weights`` with each weighted class's other pole weighed −factor·α, by the setting's
        ``unprompted_opposite_factors`` or ``prompted_opposite_factors`` (``_against_other_poles``)."""
        factors = self.prompted_opposite_factors if prompted else self.unprompted_opposite_factors
        return {**weights, **self._against_other_poles(weights, factors)}

    def ending_weights(self, weights: Mapping[str, float], prompted: bool) -> dict[str, float]:
        """The weights of the decision to end (``ending_weights`` of ``ClassifierGuidedLogitsProcessor``):
        each weighted class's other pole at −factor·α, by the setting's ``unprompted_ending_opposite_factors``
        or ``prompted_ending_opposite_factors`` (``_against_other_poles``); empty when none applies."""
        factors = self.prompted_ending_opposite_factors if prompted else self.unprompted_ending_opposite_factors
        return self._against_other_poles(weights, factors)

    def _against_other_poles(self, weights: Mapping[str, float], factors: Mapping[str, float]) -> dict[str, float]:
        """−factor·α on the other pole of each class ``weights`` weigh at α that ``factors`` names; a pole the
        weights name already, or one of another classifier's axes, gets none. Opposing poles of one axis both
        asked for would otherwise take each other's weight away."""
        return {
            other: -factors[name] * value
            for name, value in weights.items()
            if value and name in factors and (other := opposite(name)) in self.classes and not weights.get(other)
        }

    def favourite_rule(self, classes: Sequence[str], prompted: bool) -> tuple[bool, int | None]:
        """Whether guidance towards ``classes`` holds the base model's favourite to a rule of its own (only
        when every one of them names one for the setting: ``unprompted_favourite_ngrams``,
        ``prompted_favourite_ngrams``), and that rule: the strictest of theirs (None, never banned, is the
        least strict)."""
        own = self.prompted_favourite_ngrams if prompted else self.unprompted_favourite_ngrams
        if not classes or not set(classes) <= set(own):
            return False, None
        return True, min((own[name] for name in classes if own[name] is not None), default=None)


def _prior_mlp(hidden_size: int, head_size: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(hidden_size, head_size), nn.GELU(), nn.Linear(head_size, num_classes))


class _ClassScorer(nn.Module):
    """What both head layouts share: the optional learned class prior p(c | prefix)."""

    num_classes: int
    prior: nn.Module | None

    def log_prior(self, prefix_hidden: torch.Tensor) -> torch.Tensor:
        """log p(c | prefix) [..., K]; zeros (uniform, up to a constant) without a learned prior."""
        if self.prior is None:
            return prefix_hidden.new_zeros((*prefix_hidden.shape[:-1], self.num_classes), dtype=torch.float32)
        return torch.log_softmax(self.prior(prefix_hidden.float()).float(), dim=-1)


class PreferenceHead(_ClassScorer):
    """The small MLP that scores (prefix state, candidate embedding) pairs for every class."""

    def __init__(
        self,
        hidden_size: int,
        embedding_size: int,
        head_size: int,
        num_classes: int,
        learned_prior: bool = False,
        shift_rank: int = 0,
    ) -> None:
        super().__init__()
        self.head_size, self.shift_rank, self.num_classes = head_size, shift_rank, num_classes
        self.prefix_proj = nn.Linear(hidden_size, head_size)
        # one projection of the candidates for both terms, so the vocabulary is projected once per step
        self.candidate_proj = nn.Linear(embedding_size, head_size + shift_rank, bias=False)
        self.norm = nn.LayerNorm(head_size)
        self.out = nn.Linear(head_size, num_classes)
        self.shift = nn.Linear(hidden_size, num_classes * shift_rank) if shift_rank else None
        if self.shift is not None:
            nn.init.zeros_(self.shift.weight)
            nn.init.zeros_(self.shift.bias)
        self.prior = _prior_mlp(hidden_size, head_size, num_classes) if learned_prior else None

    @classmethod
    def for_config(cls, config: ClassifierConfig) -> PreferenceHead | ComposedHead:
        """The head ``config`` describes: one MLP, or one per part (``head_parts``)."""
        if config.head_parts:
            return ComposedHead.for_config(config)
        return cls(
            config.hidden_size,
            config.embedding_size,
            config.head_size,
            len(config.classes),
            learned_prior=config.class_prior == "learned",
            shift_rank=config.shift_rank,
        )

    def project(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Candidate embeddings [..., E] -> what ``forward`` reads of them [..., D + r]."""
        return self.candidate_proj(embeddings)

    def projection_key(self) -> tuple[int, ...]:
        """Changes whenever ``project`` would: for caching the projected vocabulary."""
        return (self.candidate_proj.weight.data_ptr(), self.candidate_proj.weight._version)

    def restricted_to(self, rows: list[int]) -> PreferenceHead:
        """A copy that scores only the classes at ``rows`` (in that order), without a prior: the MLP scores
        each class by its own output row (and shift rows), so each kept score is unchanged."""
        embedding_size = self.candidate_proj.in_features
        part = PreferenceHead(
            self.prefix_proj.in_features, embedding_size, self.head_size, len(rows), False, self.shift_rank
        )
        state = {name: t for name, t in self.state_dict().items() if not name.startswith("prior.")}
        index = torch.tensor(rows)
        state["out.weight"], state["out.bias"] = state["out.weight"][index], state["out.bias"][index]
        if self.shift is not None:
            shift_rows = (index.unsqueeze(-1) * self.shift_rank + torch.arange(self.shift_rank)).flatten()
            state["shift.weight"], state["shift.bias"] = (
                state["shift.weight"][shift_rows],
                state["shift.bias"][shift_rows],
            )
        part.load_state_dict(state)
        return part

    def forward(self, prefix_hidden: torch.Tensor, projected_candidates: torch.Tensor) -> torch.Tensor:
        """``prefix_hidden`` [..., H] and projected candidates [..., N, D + r] -> class scores [..., N, K]."""
        mlp_part, shift_part = projected_candidates.split([self.head_size, self.shift_rank], dim=-1)
        joint = self.prefix_proj(prefix_hidden).unsqueeze(-2) + mlp_part
        scores = self.out(self.norm(nn.functional.gelu(joint))).float()
        if self.shift is None:
            return scores
        shift = self.shift(prefix_hidden).unflatten(-1, (self.num_classes, self.shift_rank))  # [..., K, r]
        return scores + (shift_part @ shift.transpose(-1, -2)).float()


class ComposedHead(_ClassScorer):
    """Several ``PreferenceHead``s in one posterior, each scoring the classes of its part.

    The heads share one MLP's projections across the classes they score, so a head trained hard for one
    axis (tone taught by the prompted model on every answer) pushes the other axes less. Here each part's
    classes get their likelihoods s_c(h, x) from their own head, and Bayes' rule still normalises over
    every class (or axis, or part: ``normalizer``); the class prior, when learned, is one MLP over all classes.
    A class scored by several parts takes the last part's score; the main head's (first part's) scores of
    the ``shadows`` follow the classes' columns, for the main classes' posterior (``main-joint``)."""

    def __init__(
        self,
        parts: list[PreferenceHead],
        part_rows: list[list[int]],
        prior: nn.Module | None,
        shadows: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        concatenated = [(part, row) for part, rows in enumerate(part_rows) for row in rows]
        column = {scored: position for position, scored in enumerate(concatenated)}
        owner = {row: part for part, row in concatenated}  # the last part that scores a class
        self.num_classes = len(owner)
        order = [column[owner[row], row] for row in range(self.num_classes)]
        order += [column[0, row] for row in shadows or []]
        # the column of each class (then of each shadow) among the parts' concatenated scores
        self.register_buffer("order", torch.tensor(order), persistent=False)
        self.widths = [part.head_size + part.shift_rank for part in parts]
        self.prior = prior

    @classmethod
    def for_config(cls, config: ClassifierConfig) -> ComposedHead:
        rows, shadows = _part_layout(config)
        parts = [
            PreferenceHead(
                config.hidden_size, config.embedding_size, config.head_size, len(part), False, config.shift_rank
            )
            for part in rows
        ]
        learned = config.class_prior == "learned"
        prior = _prior_mlp(config.hidden_size, config.head_size, len(config.classes)) if learned else None
        return cls(parts, rows, prior, shadows)

    def project(self, embeddings: torch.Tensor) -> torch.Tensor:
        return torch.cat([part.project(embeddings) for part in self.parts], dim=-1)

    def projection_key(self) -> tuple[int, ...]:
        return tuple(key for part in self.parts for key in part.projection_key())

    def forward(self, prefix_hidden: torch.Tensor, projected_candidates: torch.Tensor) -> torch.Tensor:
        chunks = projected_candidates.split(self.widths, dim=-1)
        scores = torch.cat([part(prefix_hidden, chunk) for part, chunk in zip(self.parts, chunks, strict=True)], -1)
        return scores.index_select(-1, self.order)


def _part_layout(config: ClassifierConfig) -> tuple[list[list[int]], list[int]]:
    """The class indices each part's head scores, the main head first (those no part names, and with
    ``main-joint`` every class), and the indices of the shadowed classes."""
    index = config.classes.index
    main = config.classes if config.shadowed_classes else config.part_classes[0]
    rows = [[index(name) for name in group] for group in [main, *config.head_parts]]
    return rows, [index(name) for name in config.shadowed_classes]


def compose(
    main: PreferenceClassifier,
    donors: list[tuple[list[str], PreferenceClassifier]],
    posterior: str | None = None,
    main_guided: Sequence[str] = (),
) -> PreferenceClassifier:
    """``main`` with the likelihoods of some classes taken from other trained heads: each (classes, donor)
    pair becomes a part that scores those classes exactly as ``donor`` does, and every other class is
    scored exactly as ``main`` scores it, read under ``posterior`` (default: ``main``'s); ``main_guided``
    parts' classes keep the main head's posterior (``main_guided_classes``, added to ``main``'s). A ``main``
    that has parts already keeps them, so a head for one more axis can join a shipped composition, except a
    part whose classes a donor names exactly: the donor replaces it (a new tone head for a shipped
    composition's). The prior (if any) is ``main``'s: fit it again on the composed likelihoods (``cliper
    train --prior-on … --part …``) before reading texts with it."""
    for _, donor in donors:
        settings = ("kind", "form", "classes", "head_size", "shift_rank", "tokenizer_fingerprint")
        if mismatch := [name for name in settings if getattr(donor.config, name) != getattr(main.config, name)]:
            raise ValueError(f"A head part must match the main classifier's {', '.join(mismatch)}")
    if any(donor.config.head_parts for _, donor in donors):
        raise ValueError("A head part must be a single-head classifier (a donor may not have parts)")
    if main.config.form != "bayes":
        raise ValueError("Head parts need the bayes form, whose class likelihoods are each normalised on their own")
    # a donor naming exactly a part's classes takes that part's place (so the other parts keep their
    # places, and their guidance digests); any other donor joins as a new part
    replacing = {
        index: donor
        for index, part in enumerate(main.config.head_parts)
        for donor in donors
        if set(donor[0]) == set(part)
    }
    joining = [donor for donor in donors if all(donor is not other for other in replacing.values())]
    head_parts = [
        list(replacing[index][0]) if index in replacing else part for index, part in enumerate(main.config.head_parts)
    ]
    head_parts += [list(names) for names, _ in joining]
    update = {
        "head_parts": head_parts,
        "posterior": posterior or main.config.posterior,
        "main_guided_classes": list(dict.fromkeys([*main.config.main_guided_classes, *main_guided])),
    }
    config = ClassifierConfig.model_validate(main.config.model_copy(update=update).model_dump())  # check the parts
    rows, shadows = _part_layout(config)
    own_heads = list(main.head.parts) if isinstance(main.head, ComposedHead) else [main.head]
    scored, _ = _part_layout(main.config)  # the rows each of main's heads scores now; a donor scores all
    every_row = list(range(len(config.classes)))
    for index, (_, donor) in replacing.items():
        own_heads[index + 1], scored[index + 1] = donor.head, every_row
    heads = [*own_heads, *(donor.head for _, donor in joining)]
    scored += [every_row] * len(joining)
    parts = [
        head.restricted_to([had.index(row) for row in part])
        for head, had, part in zip(heads, scored, rows, strict=True)
    ]
    head = ComposedHead(parts, rows, copy.deepcopy(main.head.prior), shadows)
    return PreferenceClassifier(config, main.backbone, head).eval()


def class_conditional(scores: torch.Tensor, candidate_log_lm: torch.Tensor) -> torch.Tensor:
    """log p(x | prefix, c) = log p_LM(x) + s_c(x) - logsumexp_{x'} (log p_LM(x') + s_c(x')) over the N
    candidates, from class scores [..., N, K] and the candidates' base log-probs [..., N]."""
    joint = candidate_log_lm.float().unsqueeze(-1) + scores
    return joint - torch.logsumexp(joint, dim=-2, keepdim=True)


def normalizer(
    classes: list[str],
    posterior: str,
    part_classes: list[list[str]] | None = None,
    shadowed: list[str] | None = None,
    main_guided: Sequence[str] = (),
) -> torch.Tensor | None:
    """Which score columns each class's posterior is normalised over, as a [K, K + S] log-mask (0:
    included, -inf: not) over the classes' columns and then the ``shadowed`` classes' main-head columns
    (``main-joint``), or None for all of the classes (``joint``).

    With ``axis``, a class on a preference axis is told apart only from the axis's other pole and the
    background classes (``refusal``): the axes are independent preferences, so a request for "concise"
    and "friendly" multiplies two axis posteriors (FUDGE's product of attributes) instead of having the
    two compete in one softmax, where pushing towards "concise" also pushes away from "friendly" text.
    Classes on no axis and background classes are normalised over all classes.

    With ``part``, a class is told apart from the classes its own head part scores and the background
    classes (``head_parts``): a head trained jointly over its classes is read as it was trained, and a
    part trained for one axis (tone, taught hard) stays out of the other heads' posteriors. ``main-joint``
    reads the parts' classes so too, and the main head's classes over every row of the main head: its
    scores of its own classes and of the parts' (``shadowed``), exactly the main head's joint posterior;
    so too the ``main_guided`` parts' classes (whose own score is then their shadow column)."""
    parted = posterior in ("part", "main-joint")
    if posterior == "joint" or (parted and len(part_classes or []) < 2):
        return None
    shadowed = shadowed or []
    if parted:
        groups = {name: set(group) for group in part_classes or [] for name in group}
    else:
        groups = {name: {name, pole} for name in classes if (pole := opposite(name)) in classes}
    main = set((part_classes or [[]])[0]) if shadowed else set()
    mask = torch.zeros(len(classes), len(classes) + len(shadowed))
    for row, name in enumerate(classes):
        # the classes' columns of the main head's own classes, and its shadow columns
        if name in main or name in main_guided:
            mask[row, : len(classes)] = torch.tensor([0.0 if other in main else float("-inf") for other in classes])
        elif name in groups:
            members = groups[name] | set(BACKGROUND_CLASSES)
            mask[row] = torch.tensor(
                [0.0 if other in members else float("-inf") for other in classes] + [float("-inf")] * len(shadowed)
            )
    return mask


_TAP_LOCAL = threading.local()
_TAPPED_MODELS: set[int] = set()
_TAP_LOCK = threading.Lock()


def running_mean(states: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
    """At each position [..., T, H], the mean of the states up to it over the positions ``kept`` [..., T]
    marks (every one without it); zeros before the first kept position."""
    weights = torch.ones_like(states[..., 0]) if kept is None else kept.to(states.dtype)
    sums = (states * weights.unsqueeze(-1)).cumsum(-2)
    return sums / weights.cumsum(-1).clamp(min=1).unsqueeze(-1)


def _capture_lm_head_input(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
    if getattr(_TAP_LOCAL, "active", False):
        _TAP_LOCAL.hidden = args[0][:, -1, :]


@dataclass
class BackboneState:
    """Per-call state of one decoding run: the separate backbone's cache and how far it has read."""

    incremental: bool = True
    cache: DynamicCache | None = None
    consumed: int = 0
    extra: dict = field(default_factory=dict)


class PreferenceClassifier(nn.Module):
    """Scores candidate next tokens for every preference class; see the module docstring."""

    def __init__(
        self, config: ClassifierConfig, backbone: PreTrainedModel, head: PreferenceHead | ComposedHead | None = None
    ):
        super().__init__()
        if config.prior_layer is not None and config.prior_layer > (last_layer := backbone.config.num_hidden_layers):
            raise ValueError(f"prior_layer {config.prior_layer} is past the backbone's last layer ({last_layer})")
        self.config = config
        self.backbone = backbone
        self.head = head or PreferenceHead.for_config(config)
        self._projected_vocab: tuple[tuple[int, ...], torch.Tensor] | None = None
        self._read_columns()
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(False)

    def _read_columns(self) -> None:
        """What the posterior normalises each class over, and the class whose prior each score column
        takes (the classes', then the shadows': ``main-joint``), from the config."""
        config = self.config
        shadowed, by_main = config.shadowed_classes, config.main_guided_classes
        self._normalizer = normalizer(config.classes, config.posterior, config.part_classes, shadowed)
        self._guidance_normalizer = normalizer(config.classes, config.posterior, config.part_classes, shadowed, by_main)
        self._column_classes = torch.tensor([*range(len(config.classes)), *map(config.classes.index, shadowed)])
        count = len(config.classes)
        self._guidance_columns = torch.tensor(
            [count + shadowed.index(name) if name in by_main else at for at, name in enumerate(config.classes)]
        )

    def set_head_parts(self, head_parts: list[list[str]], main_guided: Sequence[str] = ()) -> None:
        """Score each group of classes by a head of its own (freshly initialised: load the trained parts'
        weights next) and read the posterior over the parts accordingly (``main_guided_classes``)."""
        update = {"head_parts": head_parts, "main_guided_classes": list(main_guided)}
        self.config = ClassifierConfig.model_validate({**self.config.model_dump(), **update})
        self.head = PreferenceHead.for_config(self.config)
        self._read_columns()

    @classmethod
    def create(
        cls,
        base: LoadedModel,
        classes: list[str],
        kind: Literal["shared", "separate"] = "shared",
        backbone: LoadedModel | None = None,
        head_size: int = 256,
        seed: int = 0,
        form: Literal["direct", "bayes"] = "direct",
        class_prior: Literal["uniform", "learned"] = "uniform",
        posterior: Literal["joint", "axis", "part"] = "joint",
        guidance_prior: Literal["learned", "uniform"] = "learned",
        prior_layer: int | None = None,
        shift_rank: int = 0,
        prior_pooling: Literal["last", "mean"] = "last",
    ) -> PreferenceClassifier:
        """A freshly initialised classifier for ``base`` (train it before use)."""
        if kind == "separate" and backbone is None:
            raise ValueError("A separate-backbone classifier needs a backbone model")
        if kind == "separate" and form == "bayes":
            raise ValueError("The bayes form is trained on the base model's own hidden states: use kind='shared'")
        if form == "direct" and class_prior != "uniform":
            raise ValueError("A class prior belongs to the bayes form (the direct form has no Bayes' rule)")
        source = base if kind == "shared" else backbone
        assert source is not None
        fingerprint = tokenizer_fingerprint(base.tokenizer)
        if tokenizer_fingerprint(source.tokenizer) != fingerprint:
            raise VocabularyMismatchError(VOCABULARY_MISMATCH)
        torch.manual_seed(seed)
        config = ClassifierConfig(
            kind=kind,
            classes=list(classes),
            hidden_size=source.model.config.hidden_size,
            embedding_size=source.model.get_input_embeddings().embedding_dim,
            head_size=head_size,
            shift_rank=shift_rank,
            tokenizer_fingerprint=fingerprint,
            backbone=None if kind == "shared" else source.spec,
            base_model=base.name,
            form=form,
            class_prior=class_prior,
            posterior=posterior,
            guidance_prior=guidance_prior,
            prior_layer=prior_layer,
            prior_pooling=prior_pooling,
        )
        return cls(config, source.model)

    @property
    def classes(self) -> list[str]:
        return self.config.classes

    @property
    def kind(self) -> str:
        return self.config.kind

    # --- prefix state -------------------------------------------------------------------------

    @contextmanager
    def tap(self, model: PreTrainedModel):
        """While active in this thread, remember the base model's final hidden state of each forward.

        The hook is registered once per model and writes to thread-local storage, so concurrent calls
        in other threads neither see nor disturb this call's state.
        """
        with _TAP_LOCK:
            if id(model) not in _TAPPED_MODELS:
                model.get_output_embeddings().register_forward_pre_hook(_capture_lm_head_input)
                _TAPPED_MODELS.add(id(model))
        _TAP_LOCAL.active, _TAP_LOCAL.hidden = True, None
        try:
            yield
        finally:
            _TAP_LOCAL.active, _TAP_LOCAL.hidden = False, None

    def prefix_hidden(
        self, state: BackboneState, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The backbone's final hidden state after reading ``input_ids`` (left-padded) [B, H]."""
        if self.kind == "shared" and state.incremental and getattr(_TAP_LOCAL, "active", False):
            tapped = _TAP_LOCAL.hidden
            if tapped is None or tapped.shape[0] != input_ids.shape[0]:
                raise RuntimeError("No hidden state was tapped from the base model for this step")
            return tapped.float()
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if not state.incremental:
            return self._backbone_last_hidden(input_ids, attention_mask, position_ids, None)
        if state.cache is None:
            state.cache = DynamicCache(config=self.backbone.config)
        new = slice(state.consumed, input_ids.shape[1])
        hidden = self._backbone_last_hidden(input_ids[:, new], attention_mask, position_ids[:, new], state.cache)
        state.consumed = input_ids.shape[1]
        return hidden

    @torch.no_grad()
    def _backbone_last_hidden(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        outputs = self.backbone.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
        )
        return outputs.last_hidden_state[:, -1, :].float()

    # --- scoring ------------------------------------------------------------------------------

    def _candidate_table(self) -> torch.Tensor:
        return self.backbone.get_input_embeddings().weight

    def _projected_vocabulary(self) -> torch.Tensor:
        """W_e e(x) for the whole vocabulary, cached until the head's weights change."""
        key = self.head.projection_key()
        if self._projected_vocab is None or self._projected_vocab[0] != key:
            with torch.no_grad():
                self._projected_vocab = (key, self.head.project(self._candidate_table().float()))
        return self._projected_vocab[1]

    def _project(self, ids: torch.Tensor) -> torch.Tensor:
        """W_e e(x) for token ids [...] -> [..., D], each distinct id projected once (a training batch
        repeats the same few thousand tokens tens of times). ``index_select``, not ``[inverse]``: its
        gradient (index_add) sums in a fixed order on CPU, so seeded training is reproducible."""
        distinct, inverse = ids.unique(return_inverse=True)
        projected = self.head.project(self._candidate_table()[distinct].float())
        return projected.index_select(0, inverse.flatten()).view(*ids.shape, -1)

    def log_probs(
        self,
        prefix_hidden: torch.Tensor,
        candidates: torch.Tensor | None = None,
        candidate_log_lm: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log p_cls(c | prefix, x): [B, N, K] for candidate ids [B, N], or [B, V, K] when None.

        The bayes form also needs the base model's log-probs of those candidates ([B, N] or [B, V]).
        """
        if candidates is None:
            projected = self._projected_vocabulary().unsqueeze(0)
            if candidate_log_lm is not None:  # the embedding table may hold more rows than the LM scores
                missing = projected.shape[-2] - candidate_log_lm.shape[-1]
                candidate_log_lm = nn.functional.pad(candidate_log_lm, (0, missing), value=float("-inf"))
        else:
            projected = self._project(candidates)
        scores = self.head(prefix_hidden.float(), projected)
        if self.config.form == "direct":
            return self.normalize(scores, guiding=True)
        if candidate_log_lm is None:
            raise ValueError("A bayes-form classifier needs the base model's log-probs of the candidates")
        # candidates with log p_LM = -inf take no part in the sums and come out as NaN rows, which the
        # logits processor masks
        conditional = class_conditional(scores, candidate_log_lm)
        if not self.guides_with_prior:  # a uniform prior: Bayes' rule is the normalisation alone
            return self.normalize(conditional, guiding=True)
        return self.posterior(conditional, self.head.log_prior(prefix_hidden).unsqueeze(-2), guiding=True)

    def base_candidates(
        self, hidden: torch.Tensor, next_ids: torch.Tensor, top_k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The base model's ``top_k`` candidates after final hidden states [..., H], their log-probs, and
        the log-prob of the observed next tokens [...] (the shared backbone *is* the base model, so its
        output layer gives p_LM): what the bayes form scores an observed token among."""
        log_lm = self.base_log_probs(hidden)
        top = log_lm.topk(top_k, dim=-1)
        return top.indices, top.values, log_lm.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1)

    @torch.no_grad()
    def base_log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """log p_LM(· | prefix) over the vocabulary [..., V] from the shared backbone's final states [..., H]."""
        if self.kind != "shared":
            raise ValueError("Base log-probs come from the shared backbone's own output layer")
        output_embeddings = self.backbone.get_output_embeddings()
        return torch.log_softmax(output_embeddings(hidden.to(output_embeddings.weight.dtype)).float(), dim=-1)

    def sequence_log_probs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, top_k: int = 32, answer_start: int = 0
    ) -> torch.Tensor:
        """For each position t, log p_cls(c | tokens ≤ t, token t+1): [B, T-1, K] (training and measuring).

        The bayes form scores token t+1 among the base model's ``top_k`` candidates and itself. A pooled
        prior (``prior_pooling``) averages the states from the one that predicts the answer's first token,
        ``input_ids[:, answer_start]``, as training does."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        layer = self.config.prior_layer
        with torch.no_grad():
            outputs = self.backbone.base_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                output_hidden_states=layer is not None,
            )
        hidden = outputs.last_hidden_state.float()[:, :-1]
        next_ids = input_ids[:, 1:]
        if self.config.form == "direct":
            return self.token_log_probs(hidden, next_ids)
        prior_hidden = None
        if layer is not None:
            read = attention_mask[:, :-1].clone()
            read[:, : max(answer_start - 1, 0)] = 0
            prior_hidden = self.prior_states(outputs.hidden_states[layer].float()[:, :-1], read)
        return self.token_log_probs(
            hidden, next_ids, *self.base_candidates(hidden, next_ids, top_k), prior_hidden=prior_hidden
        )

    def token_log_probs(
        self,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        candidates: torch.Tensor | None = None,
        candidate_log_lm: torch.Tensor | None = None,
        next_log_lm: torch.Tensor | None = None,
        prior_hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Class log-probs for observed (hidden state, next token) pairs: [..., K].

        The bayes form scores the observed token among the base model's candidates [..., k] (their
        log-probs [..., k] and its own [...]); a prior on another layer reads ``prior_hidden``."""
        if self.config.form == "direct":
            projected = self._project(next_ids).unsqueeze(-2)
            return self.normalize(self.head(hidden, projected).squeeze(-2))
        return self.posterior(
            self.token_log_likelihoods(hidden, next_ids, candidates, candidate_log_lm, next_log_lm),
            self.reading_log_prior(hidden, prior_hidden),
        )

    def prior_states(self, states: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
        """What the prior reads of ``prior_layer``'s states along an answer [..., T, H] (the positions
        ``kept`` [..., T] marks, every one without it): the states themselves, or their running mean."""
        return running_mean(states, kept) if self.config.prior_pooling == "mean" else states

    def reading_log_prior(self, hidden: torch.Tensor, prior_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """log p(c | prefix) for reading a text: from the final states ``hidden``, or from ``prior_hidden``
        (what ``prior_states`` gives of ``prior_layer``'s) when the prior reads another layer."""
        if self.config.prior_layer is None:
            return self.head.log_prior(hidden)
        if prior_hidden is None:
            raise ValueError(f"This classifier's prior reads layer {self.config.prior_layer}: pass its states")
        return self.head.log_prior(prior_hidden)

    def posterior(self, log_likelihoods: torch.Tensor, log_prior: torch.Tensor, guiding: bool = False) -> torch.Tensor:
        """Bayes form: log p(c | prefix, x) [..., K] from log p(x | prefix, c) per score column [..., C] and
        the class prior log p(c | prefix) [..., K] (broadcast to it; a shadow column takes its class's),
        by Bayes' rule; ``guiding``: as decoding reads it (``normalize``)."""
        if log_likelihoods.shape[-1] > log_prior.shape[-1]:
            log_prior = log_prior.index_select(-1, self._column_classes.to(log_prior.device))
        return self.normalize(log_likelihoods + log_prior, guiding)

    def normalize(self, class_scores: torch.Tensor, guiding: bool = False) -> torch.Tensor:
        """Scores per column [..., C] (the classes', then any shadows') -> class log-probs [..., K], each
        class normalised over its ``normalizer`` set; given the classes' columns alone, over those of them.
        ``guiding``: as decoding reads them, where a main-guided class takes the main head's posterior."""
        mask = self._guidance_normalizer if guiding else self._normalizer
        if mask is None:
            return torch.log_softmax(class_scores, dim=-1)
        if guiding and class_scores.shape[-1] > len(self.classes):
            scores = class_scores.index_select(-1, self._guidance_columns.to(class_scores.device))
        else:
            scores = class_scores[..., : len(self.classes)]
        mask = mask[:, : class_scores.shape[-1]].to(class_scores.device)
        return scores - torch.logsumexp(class_scores.unsqueeze(-2) + mask, dim=-1)

    def token_log_likelihoods(
        self,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        candidates: torch.Tensor | None,
        candidate_log_lm: torch.Tensor | None,
        next_log_lm: torch.Tensor | None,
    ) -> torch.Tensor:
        """Bayes form: log p(x_t | prefix, c) of each observed token among the base candidates, per score
        column [..., C] (the classes', then any shadows': ``ComposedHead``); a candidate equal to the
        observed token counts once."""
        if candidates is None or candidate_log_lm is None or next_log_lm is None:
            raise ValueError("A bayes-form classifier scores a token among the base model's candidates")
        # a duplicate of the observed token drops out of the sums (exp(-1e4) is 0 in float32) with no
        # -inf, whose NaN would reach the gradient
        others = candidate_log_lm.float().masked_fill(candidates == next_ids.unsqueeze(-1), -1e4)
        ids = torch.cat([next_ids.unsqueeze(-1), candidates.long()], dim=-1)
        log_lm = torch.cat([next_log_lm.float().unsqueeze(-1), others], dim=-1)
        return self.candidate_log_likelihoods(hidden, ids, log_lm)[..., 0, :]

    def candidate_log_likelihoods(
        self, hidden: torch.Tensor, candidates: torch.Tensor, candidate_log_lm: torch.Tensor
    ) -> torch.Tensor:
        """Bayes form: log p(x | prefix, c) for every candidate x [..., N] and score column, over those
        candidates: [..., N, C]."""
        return class_conditional(self.head(hidden.float(), self._project(candidates.long())), candidate_log_lm)

    @property
    def guides_with_prior(self) -> bool:
        """Whether decoding reads the learned class prior (``guidance_prior``)."""
        return self.head.prior is not None and self.config.guidance_prior == "learned"

    def guidance_digest(self, classes: Sequence[str] | None = None, prompted: bool | None = None) -> str:
        """SHA-256 of everything that decides how candidates are scored at decoding: classes, form,
        posterior, whether the prior takes part, and the weights guidance reads (a learned prior that
        decoding leaves out is not among them). Two classifiers with one digest steer alike. With
        ``classes``, of what guidance towards those classes reads: under ``main-joint`` the main head's
        classes are guided exactly as by the main head alone, whose digest they then share, and a part's
        classes by the head parts their posteriors read (``_parts_read``). Per-class
        plausibility floors count for the classes they name (all of them without ``classes``), as does the
        loop guard's rule for the favourite where the classes decide it (``favourite_rule``), and the factors
        that weigh their other poles (``opposite_weights``), whose posteriors guidance then reads too: all in
        the setting ``prompted`` names (both settings without it)."""
        per_setting = {False: "unprompted_", True: "prompted_"}
        settings_named = [prefix for p, prefix in per_setting.items() if prompted in (None, p)]
        opposite_fields = [f"{prefix}{kind}opposite_factors" for prefix in settings_named for kind in ("", "ending_")]
        opposed = {name for field_name in opposite_fields for name in getattr(self.config, field_name)}
        read_classes = (
            None
            if classes is None
            else [*classes, *(o for n in classes if n in opposed and (o := opposite(n)) in self.classes)]
        )
        if read_classes is not None and (main := self._main_head_alone(read_classes)) is not None:
            return main.guidance_digest(classes, prompted)
        settings = {
            "classes": self.classes,
            "form": self.config.form,
            "posterior": self.config.posterior,
            "prior": "learned" if self.guides_with_prior else "uniform",
        }
        per_class_names = ("plausibility_floors", *(f"{prefix}plausibility_floors" for prefix in settings_named))
        per_class_names += tuple(opposite_fields)
        for field_name in per_class_names:
            own = getattr(self.config, field_name)
            if named := {name: own[name] for name in (self.classes if classes is None else classes) if name in own}:
                settings[field_name] = named  # absent when none: digests from before the field hold
        settings.update(self._favourite_settings(classes, prompted))
        read = self._parts_read(read_classes)
        if by_main := self._main_guided_told_apart(classes, read):
            settings["main_guided_classes"] = by_main  # absent when none: digests from before it hold
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        for name, tensor in sorted(self.head.state_dict().items()):
            if name.startswith("prior.") and not self.guides_with_prior:
                continue
            if read is None or any(name.startswith(f"parts.{part}.") for part in read):
                digest.update(name.encode() + tensor.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()

    def _parts_read(self, classes: Sequence[str] | None) -> set[int] | None:
        """The head parts whose scores guidance towards ``classes`` reads (their posteriors' columns), or
        None for the whole head. A part's classes under ``part`` or ``main-joint`` read their own part and
        the background's, so a head that joins for another axis leaves their digest as it was."""
        mask = self._guidance_normalizer
        if classes is None or self.guides_with_prior or mask is None or not self.config.head_parts:
            return None
        rows, shadows = _part_layout(self.config)
        owner = {row: part for part, scored in enumerate(rows) for row in scored}  # the last part scoring it
        columns = [*range(len(self.classes)), *shadows]
        read = set()
        for name in classes:
            included = (mask[self.classes.index(name)] == 0).tolist()
            read |= {
                owner[row] if at < len(self.classes) else 0
                for at, (row, on) in enumerate(zip(columns, included, strict=True))
                if on
            }
        return read

    def _main_guided_told_apart(self, classes: Sequence[str] | None, read: set[int] | None) -> list[str]:
        """The main-guided classes a digest names: those whose own part it also hashes (``read``), where the
        weights alone would not tell a main-guided class from one its part guides. Elsewhere a main-guided
        class guides exactly as a main class does, and shares its digest."""
        parts = self.config.head_parts
        return sorted(
            name
            for name in self.config.main_guided_classes
            if (classes is None or name in classes)
            and (read is None or 1 + next(at for at, part in enumerate(parts) if name in part) in read)
        )

    def _favourite_settings(self, classes: Sequence[str] | None, prompted: bool | None) -> dict[str, object]:
        """The loop guard's rule for the favourite as ``guidance_digest`` hashes it, absent where the guard's
        own holds (as floors, so digests from before the rule hold). One class set in one setting spared
        keeps session 39's key, ``favourite_sparing_classes``, so answers made under it stand."""
        config = self.config
        if classes is None:
            both = {"unprompted": config.unprompted_favourite_ngrams, "prompted": config.prompted_favourite_ngrams}
            return {"favourite_ngrams": both} if any(both.values()) else {}
        rules = {p: config.favourite_rule(classes, p) for p in ((False, True) if prompted is None else (prompted,))}
        held = {"prompted" if p else "unprompted": n for p, (holds, n) in rules.items() if holds}
        if prompted is None:
            return {"favourite_ngrams": held} if held else {}
        if not held:
            return {}
        (n,) = held.values()
        return {"favourite_sparing_classes": sorted(classes)} if n is None else {"favourite_ngram": n}

    def _main_head_alone(self, classes: Sequence[str]) -> PreferenceClassifier | None:
        """The main head as a classifier of its own, where it alone decides guidance towards ``classes``."""
        main_classes = {*self.config.part_classes[0], *self.config.main_guided_classes}
        if not self.config.shadowed_classes or self.guides_with_prior or not set(classes) <= main_classes:
            return None
        assert isinstance(self.head, ComposedHead)
        alone = {
            "head_parts": [],
            "main_guided_classes": [],
            "posterior": "joint",
            "class_prior": "uniform",
            "prior_layer": None,
            "prior_pooling": "last",
        }
        config = ClassifierConfig.model_validate(self.config.model_copy(update=alone).model_dump())
        return PreferenceClassifier(config, self.backbone, self.head.parts[0])

    # --- persistence --------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in self.head.state_dict().items()}
        save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
        (folder / CONFIG_FILE).write_text(self.config.model_dump_json(indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path, base: LoadedModel, backbone: LoadedModel | None = None) -> PreferenceClassifier:
        """Load a saved classifier to steer ``base``; refuse one built for another vocabulary."""
        folder = Path(folder)
        config_path = folder / CONFIG_FILE
        if not config_path.is_file():
            raise ModelResolutionError(f"No classifier at {folder} (missing {CONFIG_FILE})")
        config = ClassifierConfig.model_validate_json(config_path.read_text())
        check_vocabulary(config.tokenizer_fingerprint, base.tokenizer)
        if config.kind == "shared":
            source = base.model
        else:
            backbone = backbone or load_model(config.backbone or "")
            check_vocabulary(config.tokenizer_fingerprint, backbone.tokenizer)
            source = backbone.model
        head = PreferenceHead.for_config(config)
        head.load_state_dict(load_file(folder / WEIGHTS_FILE))
        if source.config.hidden_size != config.hidden_size:
            raise VocabularyMismatchError(
                f"Classifier expects hidden size {config.hidden_size}, backbone has {source.config.hidden_size}"
            )
        return cls(config, source, head).eval()


VOCABULARY_MISMATCH = (
    "The classifier was trained for a different tokenizer than the base model's; "
    "token ids would mean different things. Train a classifier for this model with `cliper train`."
)


def check_vocabulary(fingerprint: str, tokenizer: PreTrainedTokenizerBase) -> None:
    if fingerprint != tokenizer_fingerprint(tokenizer):
        raise VocabularyMismatchError(VOCABULARY_MISMATCH)
