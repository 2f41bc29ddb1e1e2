"""Style and fluency metrics from independent libraries (never from our own classifier)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch

from cliper_integrations.core.engine import CLIPerEngine
from cliper_integrations.core.errors import MissingDependencyError
from cliper_integrations.core.prompting import question_ids


def _require_eval_extra():
    try:
        import textstat
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as error:
        raise MissingDependencyError(
            "Evaluation needs textstat and vaderSentiment: pip install 'cliper-integrations[eval]'"
        ) from error
    return textstat, SentimentIntensityAnalyzer


@lru_cache(maxsize=1)
def _vader():
    return _require_eval_extra()[1]()


def word_count(text: str) -> int:
    return len(text.split())


def fk_grade(text: str) -> float:
    """Flesch-Kincaid grade level (textstat)."""
    return float(_require_eval_extra()[0].flesch_kincaid_grade(text)) if text.strip() else 0.0


def vader_compound(text: str) -> float:
    """VADER compound sentiment in [-1, 1] (vaderSentiment)."""
    return float(_vader().polarity_scores(text)["compound"])


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct n-grams over all n-grams of a set of responses (lexical diversity)."""
    grams = [tuple(words[i : i + n]) for text in texts for words in [text.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def perplexity(engine: CLIPerEngine, prompt: str, response: str) -> float:
    """Perplexity of ``response`` under the base model, given the (unprompted) question."""
    tokenizer = engine.tokenizer
    prompt_ids = question_ids(tokenizer, prompt)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if not response_ids:
        return float("nan")
    ids = torch.tensor([prompt_ids + response_ids])
    logits = engine.model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]
    loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(response_ids))
    return math.exp(loss.item())
