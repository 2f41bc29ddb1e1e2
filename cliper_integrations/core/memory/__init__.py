"""``PreferenceMemory``: each user's preferences, stored for real, turned into guidance weights.

Backends: SQLAlchemy (an SQLite file by default, in WAL mode; PostgreSQL by URL such as
``postgresql+psycopg://user@host/db``) or any LangGraph ``BaseStore`` (``store=``). Every change is
one atomic step that writes the new profile together with its history entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

from cliper_integrations.core.memory.backends import Change, LangGraphStoreBackend, MemoryBackend, SQLBackend
from cliper_integrations.core.memory.profile import (
    InvalidProfileError,
    InvalidUserIdError,
    PreferenceProfile,
    apply_feedback,
    check_user_id,
    merge,
)
from cliper_integrations.core.memory.statements import (
    STATEMENT_STRENGTH,
    EmbeddingLearner,
    find_statements,
    keyword_preferences,
)
from cliper_integrations.core.models import cache_dir
from cliper_integrations.core.preferences import DEFAULT_CLASSES

__all__ = [
    "InvalidProfileError",
    "InvalidUserIdError",
    "PreferenceMemory",
    "PreferenceProfile",
    "as_memory",
    "default_database_url",
]

StyleMeasure = Callable[[str], Mapping[str, float]]
RATINGS = {"up": 1.0, "down": -1.0, "+1": 1.0, "-1": -1.0}


def default_database_url() -> str:
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'memory.sqlite3'}"


_BY_URL: dict[str, PreferenceMemory] = {}


def as_memory(memory: PreferenceMemory | str | None) -> PreferenceMemory | None:
    """A ``PreferenceMemory`` from an instance or a database URL (one instance per URL per process)."""
    if memory is None or isinstance(memory, PreferenceMemory):
        return memory
    if memory not in _BY_URL:
        _BY_URL[memory] = PreferenceMemory(memory)
    return _BY_URL[memory]


def _rating(value: float | bool | str) -> float:
    if isinstance(value, bool):
        return 1.0 if value else -1.0
    if isinstance(value, str):
        if value.strip().lower() not in RATINGS:
            raise InvalidProfileError(f"rating must be 'up', 'down' or a number in [-1, 1], got {value!r}")
        return RATINGS[value.strip().lower()]
    rating = float(value)
    if not math.isfinite(rating) or not -1 <= rating <= 1:
        raise InvalidProfileError(f"rating must be in [-1, 1], got {value!r}")
    return rating


class PreferenceMemory:
    """Per-user preference profiles with history, feedback learning and explicit statements.

    Args:
        url: SQLAlchemy URL; default an SQLite file in the user cache folder.
        store: a LangGraph ``BaseStore`` to use instead of SQL.
        classes: the classes profiles may name.
        style_measure: measures a response's style per class (``CLIPerEngine.measure_style``); used by
            ``record_feedback`` when no style is passed.
        learner: how ``learn_from_text`` reads statements: ``"keywords"`` or ``"embedding"``.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        store: Any | None = None,
        classes: tuple[str, ...] = DEFAULT_CLASSES,
        style_measure: StyleMeasure | None = None,
        learner: Literal["keywords", "embedding"] | Callable[[str], list[str]] = "keywords",
    ) -> None:
        if store is not None and url is not None:
            raise ValueError("Give either url or store, not both")
        self.backend: MemoryBackend = (
            LangGraphStoreBackend(store) if store is not None else SQLBackend(url or default_database_url())
        )
        self.classes = tuple(classes)
        self.style_measure = style_measure
        self._learner_choice = learner
        self._learner: Callable[[str], list[str]] | None = None

    # --- reading ---------------------------------------------------------------------------------

    def get(self, user_id: str) -> PreferenceProfile:
        """The user's profile; an unknown user has the empty (unguided) profile."""
        return self.backend.read(check_user_id(user_id)) or PreferenceProfile()

    def known(self, user_id: str) -> bool:
        return self.backend.read_json(check_user_id(user_id)) is not None

    def weights(self, user_id: str) -> dict[str, float]:
        """The guidance weight α per class the engine takes; ``{}`` for an unknown user."""
        stored = self.backend.read_json(check_user_id(user_id))
        return {} if stored is None else PreferenceProfile.model_validate_json(stored).weights()

    def history(self, user_id: str) -> list[dict[str, Any]]:
        """Every change: when, what (profile before and after), and why."""
        return self.backend.history(check_user_id(user_id))

    def export(self, user_id: str) -> dict[str, Any]:
        """All that is stored about the user, as JSON-ready data."""
        user_id = check_user_id(user_id)
        profile = self.backend.read(user_id)
        return {
            "user_id": user_id,
            "profile": None if profile is None else profile.model_dump(),
            "weights": {} if profile is None else profile.weights(),
            "version": self.backend.version(user_id),
            "history": self.backend.history(user_id),
            "feedback": self.backend.feedback(user_id),
        }

    # --- changing --------------------------------------------------------------------------------

    def set(
        self, user_id: str, profile: PreferenceProfile | Mapping[str, Any], reason: str = "set"
    ) -> PreferenceProfile:
        """Replace the profile (a ``PreferenceProfile``) or change part of it (a mapping of classes,
        ``scale``, ``cap``). A bad value raises ``InvalidProfileError`` and changes nothing."""
        user_id = check_user_id(user_id)
        if isinstance(profile, PreferenceProfile):
            unknown = set(profile.strengths) - set(self.classes)
            if unknown:
                raise InvalidProfileError(f"Unknown classes in profile: {', '.join(sorted(unknown))}")
            try:  # re-validate: model_construct or assignment may have skipped the rules
                new = PreferenceProfile.model_validate(profile.model_dump())
            except ValueError as error:
                raise InvalidProfileError(str(error)) from error
            return self.backend.modify(user_id, lambda _: Change(new, "set", reason)).profile
        partial = dict(profile)
        merge(PreferenceProfile(), {k: v for k, v in partial.items() if k not in ("scale", "cap")}, self.classes)
        return self.backend.modify(
            user_id, lambda before: Change(merge(before, partial, self.classes), "set", reason)
        ).profile

    def record_feedback(
        self,
        user_id: str,
        response_text: str,
        rating: float | bool | str,
        style: Mapping[str, float] | None = None,
        reason: str | None = None,
    ) -> PreferenceProfile:
        """Move the profile towards (rating > 0) or away from (rating < 0) the response's style.

        ``style`` is the measured probability per class (per axis); without it the response is
        measured with ``style_measure`` (the classifier). See ``profile.py`` for the update rule.
        """
        user_id = check_user_id(user_id)
        score = _rating(rating)
        if not isinstance(response_text, str) or "\x00" in response_text:
            raise InvalidProfileError("response_text must be a string without NUL characters")
        if style is None:
            if self.style_measure is None:
                raise InvalidProfileError("No style given and no classifier to measure the response with")
            style = self.style_measure(response_text)
        style = {name: float(value) for name, value in style.items()}
        if any(not math.isfinite(v) or not 0 <= v <= 1 for v in style.values()):
            raise InvalidProfileError(f"style values must be probabilities in [0, 1], got {style}")
        unknown = set(style) - set(self.classes)
        if unknown:
            raise InvalidProfileError(f"Unknown classes in style: {', '.join(sorted(unknown))}")
        event = {"rating": score, "response_text": response_text, "style": style}
        why = reason or f"feedback {score:+g}"
        return self.backend.modify(
            user_id, lambda before: Change(apply_feedback(before, score, style), "feedback", why, event)
        ).profile

    def learn_from_text(self, user_id: str, text: str) -> dict[str, float]:
        """Apply what ``text`` says about preferred answers; returns the classes changed (empty if none)."""
        user_id = check_user_id(user_id)
        statements = [s for s in find_statements(text, self._statement_learner()) if s.preference in self.classes]
        if not statements:
            return {}
        changes = {s.preference: STATEMENT_STRENGTH for s in statements}
        reason = "stated: " + " | ".join(dict.fromkeys(s.sentence for s in statements))
        self.backend.modify(user_id, lambda before: Change(merge(before, changes, self.classes), "learn", reason))
        return changes

    def forget(self, user_id: str) -> int:
        """Delete every row stored for the user; returns how many."""
        return self.backend.forget(check_user_id(user_id))

    def _statement_learner(self) -> Callable[[str], list[str]]:
        if self._learner is None:
            choice = self._learner_choice
            self._learner = (
                keyword_preferences if choice == "keywords" else EmbeddingLearner() if choice == "embedding" else choice
            )
        return self._learner
