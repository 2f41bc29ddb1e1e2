"""A user's preference profile, how it maps to guidance weights, and how feedback moves it.

Strengths are in [0, 1] per class; on each default axis at most one pole is active. Weights:

    α_c = min(scale · s_c, cap)   for s_c ≥ threshold, else 0

with defaults scale = 8.0, cap = 16.0, threshold = 0.05 (so strength 0.5 gives α = 4, strength 1
gives α = 8, the weight guidance was tuned at on training-side probes; a profile may raise ``scale``
up to the cap, α = 16, the strongest weight whose fluency has been measured: ``docs/results.md``).

Feedback works per axis on v = s_first − s_second ∈ [−1, 1]. A response whose measured style on the
axis is d = p_first − p_second ∈ [−1, 1] (from the classifier), rated r ∈ [−1, 1] (thumbs up = 1,
down = −1), moves

    v ← clip((1 − λ) · v + η · r · d, −1, 1)        η = 0.2 (rate), λ = 0.02 (decay towards neutral)

so one event changes a strength by at most η + λ, and the profile stays bounded however many events
arrive. Classes outside the default axes move the same way on s_c alone, with d = p_c.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cliper_integrations.core.errors import CLIPerError
from cliper_integrations.core.preferences import (
    AXES,
    DEFAULT_CLASSES,
    MEASURED_WEIGHT_CAP,
    canonical_class,
    opposite,
)

FEEDBACK_RATE = 0.2
FEEDBACK_DECAY = 0.02
ACTIVE_THRESHOLD = 0.05


class InvalidProfileError(CLIPerError, ValueError):
    """A profile or partial profile that breaks a rule: range, unknown class, NaN, both poles active."""


class InvalidUserIdError(CLIPerError, ValueError):
    """A user id that cannot be stored (empty, too long, not text, or holding a NUL character)."""


MAX_USER_ID_LENGTH = 512


def check_user_id(user_id: object) -> str:
    if not isinstance(user_id, str):
        raise InvalidUserIdError(f"user_id must be a string, got {type(user_id).__name__}")
    if not user_id or len(user_id) > MAX_USER_ID_LENGTH or "\x00" in user_id:
        raise InvalidUserIdError(
            f"user_id must be 1 to {MAX_USER_ID_LENGTH} characters with no NUL character (got {len(user_id)})"
        )
    return user_id


class PreferenceProfile(BaseModel):
    """What one user wants: a strength in [0, 1] per class, and the scale and cap that map it to α."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    strengths: dict[str, float] = Field(default_factory=dict)
    scale: float = Field(default=8.0, gt=0, le=20)
    cap: float = Field(default=MEASURED_WEIGHT_CAP, gt=0, le=20)

    @field_validator("strengths")
    @classmethod
    def _valid_strengths(cls, strengths: dict[str, float]) -> dict[str, float]:
        for name, value in strengths.items():
            if not isinstance(value, int | float) or math.isnan(value) or not 0 <= value <= 1:
                raise ValueError(f"strength of {name!r} must be a number in [0, 1], got {value!r}")
        for first, second in AXES.values():
            if strengths.get(first, 0) > 0 and strengths.get(second, 0) > 0:
                raise ValueError(f"opposite poles {first!r} and {second!r} cannot both be active")
        return {name: float(value) for name, value in strengths.items() if value > 0}

    def weights(self) -> dict[str, float]:
        """Guidance weights α per class (see the module docstring for the mapping)."""
        return {
            name: round(min(self.scale * value, self.cap), 6)
            for name, value in self.strengths.items()
            if value >= ACTIVE_THRESHOLD
        }


def merge(profile: PreferenceProfile, update: Mapping[str, object], classes: Iterable[str]) -> PreferenceProfile:
    """Apply a partial profile: class strengths (setting a pole clears its opposite), ``scale``, ``cap``.

    Raises ``InvalidProfileError`` and leaves ``profile`` untouched on any bad entry.
    """
    classes = tuple(classes)
    data = profile.model_dump()
    strengths = dict(data["strengths"])
    updates = dict(update)
    if isinstance(updates.get("strengths"), Mapping):
        updates = {**updates.pop("strengths"), **updates}
    try:
        for key, value in updates.items():
            if key in ("scale", "cap"):
                data[key] = value
                continue
            name = canonical_class(key, classes)
            if value is None or isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidProfileError(f"strength of {name!r} must be a number in [0, 1], got {value!r}")
            strengths[name] = float(value)
            other = opposite(name)
            if float(value) > 0 and other is not None and other not in updates:
                strengths.pop(other, None)
        data["strengths"] = strengths
        return PreferenceProfile.model_validate(data)
    except (ValueError, KeyError) as error:
        raise InvalidProfileError(str(error)) from error


def apply_feedback(profile: PreferenceProfile, rating: float, style: Mapping[str, float]) -> PreferenceProfile:
    """The bounded update rule of the module docstring, as a pure function."""
    if not math.isfinite(rating) or not -1 <= rating <= 1:
        raise InvalidProfileError(f"rating must be in [-1, 1], got {rating!r}")
    strengths = dict(profile.strengths)
    for first, second in AXES.values():
        if first not in style and second not in style:
            continue
        value = strengths.get(first, 0.0) - strengths.get(second, 0.0)
        direction = style.get(first, 0.0) - style.get(second, 0.0)
        value = max(-1.0, min(1.0, (1 - FEEDBACK_DECAY) * value + FEEDBACK_RATE * rating * direction))
        strengths[first], strengths[second] = max(value, 0.0), max(-value, 0.0)
    for name, measured in style.items():
        if name not in DEFAULT_CLASSES:
            value = (1 - FEEDBACK_DECAY) * strengths.get(name, 0.0) + FEEDBACK_RATE * rating * measured
            strengths[name] = max(0.0, min(1.0, value))
    return profile.model_copy(update={"strengths": PreferenceProfile(strengths=strengths).strengths})
