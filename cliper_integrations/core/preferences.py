"""Preference classes, their aliases and plain-words descriptions, and validation of guidance weights.

The six default classes follow the Personalized-Soups preference axes: three axes with two poles each.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from cliper_integrations.core.errors import ClassNotInClassifierError, InvalidWeightError, UnknownClassError

AXES: dict[str, tuple[str, str]] = {
    "expertise": ("elementary", "expert"),
    "length": ("concise", "informative"),
    "tone": ("friendly", "unfriendly"),
}
DEFAULT_CLASSES: tuple[str, ...] = tuple(pole for poles in AXES.values() for pole in poles)
# The strongest guidance weight α whose fluency has been measured (docs/results.md): memory's default cap,
# and the most a classifier's weight factor may raise a stored α to.
MEASURED_WEIGHT_CAP = 16.0
# Classes a classifier may tell apart but no user may ask for. "refusal" (answers that decline the task):
# trained beside the real classes, it takes the posterior of every requested class away from a refusal's
# tokens, so guidance steers away from refusing instead of into it ("I" is warm, "I'm sorry" follows).
REFUSAL = "refusal"
BACKGROUND_CLASSES: tuple[str, ...] = (REFUSAL,)
# Every class the training data and a trained classifier may hold: the user classes and the background ones.
TRAINABLE_CLASSES: tuple[str, ...] = DEFAULT_CLASSES + BACKGROUND_CLASSES
# Answers written with no request at all: the base model's own, the prefixes guidance steers from. They
# have no class, so training reads them with a teacher only (``cliper train --teacher``), never as a label.
UNREQUESTED = "unrequested"
# What reads as a refusal: the openings small instruction-tuned models decline with (English only).
REFUSAL_OPENING = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry, (?:but|i can)|i can(?:no|')t (?:assist|help|comply|provide|do)|"
    r"i cannot (?:assist|help|comply|provide|fulfill)|as an ai\b|i'm unable to|i am unable to)",
    re.IGNORECASE,
)


# Openings that hedge before they answer ("As an AI language model, I don't have opinions, but …") as often as they
# decline: a few tokens cannot tell the two apart, only what follows can (the engine's ``disclaimer_lookahead``).
DISCLAIMER_OPENING = re.compile(r"^\W*as an ai\b", re.IGNORECASE)


def is_disclaimer(text: str) -> bool:
    """True for text that opens with a disclaimer ("As an AI …"), which may be a refusal or a hedge before an answer."""
    return bool(DISCLAIMER_OPENING.search(text.strip()))


def is_refusal(text: str) -> bool:
    """True for answers that decline the task (or say nothing): training data drops or relabels them, the
    evaluation counts them, and the engine leaves a row unguided when the base model opens with one."""
    return bool(REFUSAL_OPENING.search(text.strip())) or not text.strip()


ALIASES: dict[str, str] = {
    "P1A": "elementary",
    "P1B": "expert",
    "P2A": "concise",
    "P2B": "informative",
    "P3A": "friendly",
    "P3B": "unfriendly",
}

# Requests in plain words: used to build training data and (the user classes') for ``--preference-prompt``.
PREFERENCE_REQUESTS: dict[str, str] = {
    "elementary": "Explain it so simply that a primary-school child could understand it, with everyday words.",
    "expert": "Answer for a specialist: use precise technical terms and skip the basics; only an expert should follow.",
    "concise": "Be short and to the point: answer in one or two sentences, with no background.",
    "informative": "Be thorough: give background, details and examples so the answer is complete.",
    "friendly": "Be warm, witty and funny, like a close friend chatting, with a joke or two.",
    "unfriendly": "Be curt, cold and unfriendly: no pleasantries, no encouragement, just a blunt answer.",
    "refusal": "Do not do the task. Politely decline it instead, in one or two sentences.",
}


def axis_of(name: str) -> str:
    """The default axis a class belongs to ("" for a class outside the default axes)."""
    return next((axis for axis, poles in AXES.items() if name in poles), "")


def opposite(name: str) -> str | None:
    """The other pole of the axis ``name`` belongs to, or None for a class outside the default axes."""
    for first, second in AXES.values():
        if name == first:
            return second
        if name == second:
            return first
    return None


def canonical_class(name: str, known: Iterable[str] = DEFAULT_CLASSES) -> str:
    """Map a class name or alias (case-insensitive) to its canonical name, or raise ``UnknownClassError``."""
    known = tuple(known)
    key = name.strip()
    if key.upper() in ALIASES:
        return ALIASES[key.upper()]
    for candidate in known:
        if candidate.lower() == key.lower():
            return candidate
    raise UnknownClassError(
        f"Unknown preference class {name!r}; known classes: {', '.join(known)} (aliases {', '.join(ALIASES)})"
    )


def validate_weights(weights: Mapping[str, float], classes: Iterable[str] = DEFAULT_CLASSES) -> dict[str, float]:
    """Return ``weights`` keyed by canonical class name, refusing unknown classes and bad values.

    ``classes`` are the classes the active classifier has: a known default class it lacks raises
    ``ClassNotInClassifierError``; a name known nowhere raises ``UnknownClassError``.
    """
    classes = tuple(classes)
    result: dict[str, float] = {}
    for name, raw in weights.items():
        try:
            canonical = canonical_class(name, classes)
        except UnknownClassError:
            if name.strip().lower() in BACKGROUND_CLASSES:
                raise UnknownClassError(
                    f"{name!r} is a background class: guidance steers away from it, no request may ask for it"
                ) from None
            canonical = canonical_class(name, DEFAULT_CLASSES)
            raise ClassNotInClassifierError(
                f"The classifier has no class {canonical!r}; it has: {', '.join(classes)}"
            ) from None
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise InvalidWeightError(f"Weight for {canonical!r} is not a number: {raw!r}") from None
        if math.isnan(value) or math.isinf(value) or value < 0:
            raise InvalidWeightError(f"Weight for {canonical!r} must be finite and >= 0, got {raw!r}")
        result[canonical] = result.get(canonical, 0.0) + value
    return result


def parse_weights(text: str, classes: Iterable[str] = DEFAULT_CLASSES) -> dict[str, float]:
    """Parse ``NAME=ALPHA,NAME=ALPHA`` (the CLI's ``--weights``) into validated weights."""
    pairs: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise InvalidWeightError(f"Expected NAME=ALPHA, got {item!r}")
        pairs[name.strip()] = value.strip()
    return validate_weights(pairs, classes)


def preference_request(weights: Mapping[str, float]) -> str:
    """The plain-words request for the active classes (weight > 0), strongest first."""
    active = sorted((name for name, value in weights.items() if value > 0), key=lambda n: -weights[n])
    return " ".join(PREFERENCE_REQUESTS[name] for name in active if name in PREFERENCE_REQUESTS)
