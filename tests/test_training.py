"""Data generation and classifier training on tiny models."""

from __future__ import annotations

import json
import math
import random
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from cliper_integrations.core import engine as engine_module
from cliper_integrations.core.engine import CLIPerEngine
from cliper_integrations.training.data import (
    DataGenerationConfig,
    echoes_request,
    generate_dataset,
    is_degenerate,
    is_refusal,
    keep_contrasting,
)
from cliper_integrations.training.trainer import TrainConfig, judge_row, split_by_instruction, train_classifier

STYLE_WORDS = {
    "concise": ["Paris.", "No.", "Yes.", "Done."],
    "informative": [
        "The quick brown fox jumps over the lazy dog.",
        "In thermodynamics, entropy quantifies microstates.",
        "Background matters because context explains causes.",
        "Furthermore, detailed examples illustrate each step thoroughly.",
    ],
}


def test_refusals_are_detected():
    assert is_refusal("I'm sorry, but I can't assist with that.")
    assert is_refusal("I cannot help with that request.")
    assert is_refusal("   ")
    assert not is_refusal("Sorry to hear that! Here is a recipe: ...")
    assert not is_refusal("The capital of France is Paris.")


def test_answers_stuck_in_a_loop_are_detected():
    assert is_degenerate("Just a blunt answer, no pleasantries, " + "no encouragement, " * 10)
    assert not is_degenerate("No, no, no.")  # too short to judge
    assert not is_degenerate(
        "Rain forms when water vapour condenses into droplets around dust; the droplets merge, grow heavy "
        "and fall. Warm air holds more vapour, so summer storms can drop a lot of water quickly."
    )


def test_answers_that_echo_their_request_are_detected():
    assert echoes_request("Sure! Here is a joke or two about rain: clouds cry.", "friendly")
    assert echoes_request("No pleasantries, NO encouragement: rain is water.", "unfriendly")
    assert not echoes_request("Rain is water falling from clouds, my friend!", "friendly")
    assert not echoes_request("Sure! Here is a joke or two about rain.", "concise")  # another class's request
    assert not echoes_request("a joke or two", "sarcastic")  # no built-in request: nothing to echo


def test_data_generation_is_batched_seeded_and_resumable(tmp_path, base):
    instructions = tmp_path / "instructions.jsonl"
    instructions.write_text(
        "".join(
            json.dumps({"id": f"i{n}", "instruction": f"Say something about {word}", "input": ""}) + "\n"
            for n, word in enumerate(["rain", "Paris", "foxes", "sets", "dogs"])
        )
    )
    engine = CLIPerEngine(base, classifier=None)
    config = DataGenerationConfig(
        instructions,
        tmp_path / "out.jsonl",
        num_instructions=3,
        classes=("concise", "friendly"),
        max_new_tokens=6,
        batch_size=2,
    )
    assert generate_dataset(engine, config)["written"] == 6
    rows = [json.loads(line) for line in config.output.read_text().splitlines()]
    assert {(r["id"], r["class"]) for r in rows} == {(i, c) for i in {r["id"] for r in rows} for c in config.classes}
    assert all(r["new_tokens"] <= 6 and "refusal" in r and "degenerate" in r for r in rows)
    assert generate_dataset(engine, config)["written"] == 0  # resumed: nothing left to do
    config.output.write_text("\n".join(config.output.read_text().splitlines()[:4]) + "\n")
    assert generate_dataset(engine, config)["written"] == 2
    again = tmp_path / "again.jsonl"
    generate_dataset(engine, DataGenerationConfig(**{**config.__dict__, "output": again}))
    assert sorted(again.read_text().splitlines()) == sorted(rows_as_lines(rows))
    lines = config.output.read_text().splitlines()
    config.output.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # the second row of a batch of two
    assert generate_dataset(engine, config)["written"] == 1  # answered in a batch of its own, as drawn before
    assert sorted(config.output.read_text().splitlines()) == sorted(rows_as_lines(rows))

    more = DataGenerationConfig(**{**config.__dict__, "samples": 3, "temperature": 1.5})
    assert generate_dataset(engine, more)["written"] == 12  # samples 1 and 2 only: sample 0 is there
    by_sample = defaultdict(dict)
    for r in map(json.loads, config.output.read_text().splitlines()):
        by_sample[r["sample"]][(r["id"], r["class"])] = r["response"]
    assert set(by_sample) == {0, 1, 2} and all(len(answers) == 6 for answers in by_sample.values())
    assert by_sample[1] != by_sample[2]  # each sample has its own seed


def test_unrequested_answers_are_the_base_models_own_to_the_plain_instruction(tmp_path, base):
    """``unrequested``: the instruction with no request appended (greedy here, so comparable)."""
    from cliper_integrations.core.engine import GenerationRequest

    instructions = tmp_path / "instructions.jsonl"
    instructions.write_text(json.dumps({"id": "i0", "instruction": "Say something about rain", "input": ""}) + "\n")
    engine = CLIPerEngine(base, classifier=None)
    config = DataGenerationConfig(
        instructions, tmp_path / "out.jsonl", 1, ("unrequested",), max_new_tokens=6, temperature=0.0
    )
    generate_dataset(engine, config)
    (row,) = [json.loads(line) for line in config.output.read_text().splitlines()]
    (plain,) = engine.generate_batch([GenerationRequest("Say something about rain", max_new_tokens=6, guidance=False)])
    assert row["class"] == "unrequested" and row["response"] == plain.text


def rows_as_lines(rows):
    return [json.dumps(r, ensure_ascii=False) for r in rows]


def test_only_answers_that_show_their_class_against_the_opposite_pole_are_kept():
    simple = "The cat sat on the mat. It was warm. The cat was happy."
    technical = (
        "Thermodynamic equilibrium necessitates simultaneous minimisation of the Helmholtz free energy "
        "under isothermal, isochoric constraints, characterising macroscopic configurational stability."
    )

    def row(instruction: str, name: str, response: str, model: str = "m") -> dict:
        return {"id": instruction, "class": name, "response": response, "model": model}

    rows = [
        row("a", "elementary", simple),
        row("a", "expert", technical),  # two pole answers that differ: both kept
        row("b", "elementary", technical),
        row("b", "expert", technical),  # "expert" no harder than "elementary": both dropped
        row("c", "concise", "Paris."),  # its pole partner was written by another model: dropped
        row("c", "informative", simple + " " + simple, model="other"),
        row("d", "concise", "Paris."),
        row("d", "informative", simple + " " + simple),
        row("e", "friendly", "I love this, you are wonderful and great!"),
        row("e", "unfriendly", "This is terrible, awful and stupid."),
        row("f", "pirate", "Arr."),  # a class of its own has no pole to compare with
    ]
    kept, dropped = keep_contrasting(rows)
    assert [(r["id"], r["class"]) for r in kept] == [
        ("a", "elementary"),
        ("a", "expert"),
        ("d", "concise"),
        ("d", "informative"),
        ("e", "friendly"),
        ("e", "unfriendly"),
        ("f", "pirate"),
    ]
    assert dropped == {"expertise": 2, "length": 2}


def test_among_several_samples_the_clearest_pair_of_each_group_is_kept():
    def row(name: str, response: str, sample: int) -> dict:
        return {"id": "a", "class": name, "response": response, "model": "m", "sample": sample}

    rows = [
        row("friendly", "Okay.", 0),
        row("unfriendly", "Fine.", 0),  # sample 0 alone shows no tone: the pair would be dropped
        row("friendly", "I love this, you are wonderful and great!", 1),
        row("unfriendly", "This is terrible, awful and stupid.", 1),
        row("friendly", "Nice, thanks.", 2),
        row("concise", "Paris.", 0),  # no informative answer from the same model: dropped
    ]
    kept, dropped = keep_contrasting(rows)
    assert [(r["class"], r["sample"]) for r in kept] == [("friendly", 1), ("unfriendly", 1)]
    assert dropped == {"tone": 3, "length": 1}


def test_pole_limits_drop_answers_that_show_their_pole_only_against_their_partner():
    def row(instruction: str, name: str, response: str, sample: int = 0) -> dict:
        return {"id": instruction, "class": name, "response": response, "model": "m", "sample": sample}

    warm = "I love this, you are wonderful and great!"
    mild = "Okay, here is the answer."  # positive VADER, yet far less warm than its partner
    curt = "This is terrible, awful and stupid."
    rows = [
        row("a", "friendly", warm),
        row("a", "unfriendly", mild),  # passes the 0.4 contrast, not unfriendly=0: the pair goes
        row("b", "friendly", warm),
        row("b", "unfriendly", mild),
        row("b", "friendly", warm, 1),
        row("b", "unfriendly", curt, 1),  # the clearest pair within the limit wins
    ]
    assert [(r["id"], r["class"], r["sample"]) for r in keep_contrasting(rows)[0]] == [
        ("a", "friendly", 0),
        ("a", "unfriendly", 0),
        ("b", "friendly", 1),
        ("b", "unfriendly", 1),
    ]
    kept, dropped = keep_contrasting(rows, {"unfriendly": 0.0})
    assert [(r["id"], r["class"], r["sample"]) for r in kept] == [("b", "friendly", 1), ("b", "unfriendly", 1)]
    assert dropped == {"tone": 4}
    # the pole measured higher is bounded from below: no friendly answer reaches +0.99, so none is kept
    assert keep_contrasting(rows, {"friendly": 0.99})[0] == []
    with pytest.raises(ValueError, match="not on a preference axis"):
        keep_contrasting(rows, {"pirate": 0.0})


def test_pole_limits_need_the_contrast_filter_and_finite_bounds(tmp_path):
    with pytest.raises(ValueError, match="contrast filter"):
        TrainConfig(data=[tmp_path / "d.jsonl"], output=tmp_path, contrast_filter=False, pole_limits={"unfriendly": 0})
    with pytest.raises(ValueError, match="finite"):
        TrainConfig(data=[tmp_path / "d.jsonl"], output=tmp_path, pole_limits={"unfriendly": math.nan})


def test_each_generated_row_is_kept_relabelled_or_dropped_for_one_named_reason():
    def row(name: str, response: str) -> dict:
        return {"id": "a", "class": name, "response": response}

    answer = "Paris is the capital of France, on the Seine, with about two million people."
    loop = "no pleasantries, " * 8
    classes = ("concise", "unfriendly", "refusal")
    assert judge_row(row("concise", answer), classes) == (row("concise", answer), None)
    assert judge_row(row("concise", "I'm sorry, I can't help."), classes)[0]["class"] == "refusal"
    assert judge_row(row("concise", "I'm sorry, I can't help."), ("concise",)) == (None, "refusals")
    assert judge_row(row("refusal", answer), classes) == (None, "refusal_requests_answered")
    assert judge_row(row("unfriendly", loop), classes) == (None, "degenerate")
    assert judge_row(row("unfriendly", "No pleasantries, no encouragement, just a blunt answer."), classes) == (
        None,
        "echoes",
    )
    assert judge_row(row("expert", answer), classes) == (None, None)  # not trained, not counted as dropped


def test_split_keeps_each_instruction_on_one_side_as_data_grows():
    rows = [{"id": f"i{n}", "class": c} for n in range(1000) for c in ("concise", "expert")]
    train, val = split_by_instruction(rows, 0.25, seed=0)
    assert {r["id"] for r in train}.isdisjoint({r["id"] for r in val})
    assert 200 <= len({r["id"] for r in val}) <= 300
    _, first_val = split_by_instruction(rows[:200], 0.25, seed=0)
    assert first_val == [r for r in val if r in rows[:200]]  # adding data moves no instruction across
    _, other_seed = split_by_instruction(rows, 0.25, seed=1)
    assert other_seed != val


def _style_rows(count: int) -> list[dict]:
    """Answers to ``count`` instructions in two separable styles, one per length class."""
    rng = random.Random(0)
    return [
        {
            "id": f"i{n}",
            "instruction": f"Question {n}?",
            "input": "",
            "class": name,
            "response": " ".join(rng.sample(STYLE_WORDS[name], 3)),
            "truncated": False,
            "refusal": False,
            "model": "tiny" if n % 2 else "other",
        }
        for n in range(count)
        for name in ("concise", "informative")
    ]


@pytest.mark.parametrize(
    ("form", "class_prior", "kind", "posterior", "response_weight"),
    [
        ("bayes", "uniform", "shared", "joint", 0.0),
        ("bayes", "uniform", "shared", "axis", 0.5),
        ("bayes", "learned", "shared", "joint", 0.0),
        ("direct", "uniform", "shared", "joint", 0.0),
        ("direct", "uniform", "separate", "joint", 0.0),
    ],
)
def test_classifier_learns_a_separable_style(
    tmp_path, base, separate_backbone, form, class_prior, kind, posterior, response_weight
):
    backbone = separate_backbone if kind == "separate" else None
    rows = _style_rows(40)
    rows.append({**rows[0], "id": "i99", "response": "I'm sorry, but I can't assist.", "refusal": True})
    rows.append({**rows[0], "id": "i98", "response": "no, no, no, no, " * 8})
    rows.append({**rows[0], "id": "i97", "response": "Paris. Short and to the point!"})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = _tiny_config(
        data,
        tmp_path / "clf",
        epochs=60,
        patience=10,
        feature_cache=tmp_path / "features",
        form=form,
        class_prior=class_prior,
        posterior=posterior,
        response_weight=response_weight,
    )
    metrics = train_classifier(base, config, backbone)
    assert len(list(config.feature_cache.iterdir())) == len(rows) - 3  # one file per usable response
    assert set(metrics["validation_by_model"]) == {"tiny", "other"}
    assert metrics["data"]["refusals_dropped"] == 1 and metrics["data"]["degenerate_dropped"] == 1
    assert metrics["data"]["echoes_dropped"] == 1
    assert metrics["validation"]["response_accuracy"] >= 0.9
    assert metrics["validation"]["axes"]["length"]["response_accuracy"] >= 0.9
    assert (config.output / "classifier.safetensors").exists() and (config.output / "metrics.json").exists()
    # the saved classifier steers: "concise" favours the short style's first token
    from cliper_integrations.core.classifier import PreferenceClassifier

    loaded = PreferenceClassifier.load(config.output, base, backbone)
    assert loaded.config.form == form and loaded.config.class_prior == class_prior and loaded.kind == kind
    assert loaded.config.posterior == posterior
    scores = _first_token_posteriors(loaded, base, "Question 7?", ["Paris.", "The"])
    assert scores[0, 0] > scores[0, 1] and scores[1, 1] > scores[1, 0]
    # a second run reads every response from the feature cache and reproduces the first
    again = train_classifier(base, TrainConfig(**{**config.__dict__, "output": tmp_path / "again"}), backbone)
    assert again["validation"] == metrics["validation"]


def _tiny_config(data: Path, output: Path, **settings) -> TrainConfig:
    """A training run sized for the tiny test models: a small head, a high rate, no dropout, 8 candidates."""
    tiny = {
        "classes": ("concise", "informative"),
        "head_size": 32,
        "learning_rate": 1e-2,
        "dropout": 0.0,
        "candidates": 8,
    }
    return TrainConfig(data=[data], output=output, **{**tiny, **settings})


def _first_token_posteriors(classifier, base, question: str, words: list[str]) -> torch.Tensor:
    """log p_cls(c | prompt, x) [len(words), K] for the first token x of each word, as guidance reads it."""
    from cliper_integrations.core.classifier import BackboneState

    first_tokens = torch.tensor([[base.tokenizer(w)["input_ids"][0] for w in words]])
    rendered = base.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    prompt = torch.tensor([base.tokenizer(rendered)["input_ids"]])
    hidden = classifier.prefix_hidden(BackboneState(incremental=False), prompt, torch.ones_like(prompt))
    log_lm = torch.log_softmax(base.model(input_ids=prompt).logits[:, -1].detach(), -1).gather(1, first_tokens)
    return classifier.log_probs(hidden, first_tokens, log_lm)[0]


@pytest.mark.parametrize("prior_layer", [None, 1])
def test_a_prior_fitted_on_top_of_a_trained_head_leaves_guidance_as_it_was(tmp_path, base, prior_layer, monkeypatch):
    """``prior_on``: the likelihood head is copied and frozen, only the learned prior trains; with
    ``guidance_prior: uniform`` the new classifier steers exactly as the old one and reads with the prior
    (from the final states, or from a middle layer's, which join the cached features)."""
    from safetensors.torch import load_file

    from cliper_integrations.core.classifier import PreferenceClassifier

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _style_rows(30)))
    first = _tiny_config(data, tmp_path / "likelihood", epochs=3, feature_cache=tmp_path / "features")
    train_classifier(base, first)
    cached = sorted(first.feature_cache.iterdir())
    probed = json.loads((first.output / "classifier.json").read_text())
    probed_settings = {
        "prompted_weight_factors": {"concise": 0.25},
        "unprompted_weight_factors": {"concise": 2.0},
        "plausibility_floors": {"concise": 0.3},
        "unprompted_favourite_ngrams": {"concise": None},
        "prompted_favourite_ngrams": {"concise": 8},
    }
    (first.output / "classifier.json").write_text(json.dumps({**probed, **probed_settings}))
    second = TrainConfig(
        **{
            **first.__dict__,
            "output": tmp_path / "prior",
            "prior_on": first.output,
            "guidance_prior": "uniform",
            "prior_layer": prior_layer,
        }
    )
    metrics = train_classifier(base, second)
    old, new = PreferenceClassifier.load(first.output, base), PreferenceClassifier.load(second.output, base)
    assert new.config.class_prior == "learned" and new.config.guidance_prior == "uniform"
    assert new.config.prior_layer == prior_layer and metrics["validation"]["response_accuracy"] >= 0.9
    # guidance, and so its scaling, its floor and its loop guard, carries over
    assert {key: getattr(new.config, key) for key in probed_settings} == probed_settings
    assert new.guidance_digest(["concise"]) == old.guidance_digest(["concise"])
    assert sorted(first.feature_cache.iterdir()) == cached  # the same responses, the same files ...
    stored = load_file(cached[0])
    assert ("hidden.1" in stored) == (prior_layer == 1) and "candidates" in stored  # ... the layer joins them
    assert metrics["config"]["prior_on"] == str(first.output)
    for name, tensor in old.head.state_dict().items():
        torch.testing.assert_close(new.head.state_dict()[name], tensor, rtol=0, atol=0)
    untrained = PreferenceClassifier.create(base, new.classes, form="bayes", class_prior="learned", head_size=32)
    assert not torch.equal(new.head.prior[0].weight, untrained.head.prior[0].weight)
    words = ["Paris.", "The"]
    guided_old, guided_new = (_first_token_posteriors(c, base, "Question 3?", words) for c in (old, new))
    torch.testing.assert_close(guided_new, guided_old)
    # a reading-only prior (the shipped default's kind) is left behind and fitted again on the same head;
    # "default" names the classifier packaged for the base model
    packaged = tmp_path / "packaged"
    shutil.copytree(second.output, packaged / base.name)
    monkeypatch.setattr(engine_module, "PACKAGED_CLASSIFIERS", packaged)
    third = TrainConfig(**{**second.__dict__, "output": tmp_path / "again", "prior_on": Path("default")})
    assert train_classifier(base, third)["config"]["prior_on"] == "default"
    again = PreferenceClassifier.load(third.output, base)
    assert again.guidance_digest() == old.guidance_digest()
    for name, tensor in new.head.state_dict().items():  # seeded: the same prior as fitted on the first head
        torch.testing.assert_close(again.head.state_dict()[name], tensor, rtol=0, atol=0)
    # a prior that guides, or a head of another size, is refused before any training
    guiding = TrainConfig(**{**first.__dict__, "output": tmp_path / "guiding", "class_prior": "learned", "epochs": 1})
    train_classifier(base, guiding)
    with pytest.raises(ValueError, match="prior-on"):
        train_classifier(base, TrainConfig(**{**second.__dict__, "prior_on": guiding.output}))
    with pytest.raises(ValueError, match="prior-on"):
        train_classifier(base, TrainConfig(**{**second.__dict__, "head_size": 16}))


def test_the_feature_cache_keeps_each_dtypes_encoding_apart(tmp_path, base):
    """Features encoded in bfloat16 differ from float32's: a run in one dtype must neither read nor
    overwrite the other's cached files, while float32 runs keep finding theirs."""
    import copy
    import dataclasses

    from cliper_integrations.core.classifier import PreferenceClassifier
    from cliper_integrations.training.trainer import encode_rows

    half = dataclasses.replace(base, model=copy.deepcopy(base.model).to(torch.bfloat16))
    classifier, half_classifier = (
        PreferenceClassifier.create(loaded, ["concise", "informative"], form="bayes", head_size=32)
        for loaded in (base, half)
    )
    rows, cache = _style_rows(2), tmp_path / "cache"
    first = encode_rows(classifier, base, rows, cache, candidates=8)
    files = len(rows)
    halved = encode_rows(half_classifier, half, rows, cache, candidates=8)
    assert len(list(cache.iterdir())) == 2 * files  # its own files beside float32's
    assert not any(torch.equal(a["hidden"], b["hidden"]) for a, b in zip(first, halved, strict=True))
    again = encode_rows(classifier, base, rows, cache, candidates=8)
    assert len(list(cache.iterdir())) == 2 * files
    assert all(torch.equal(a["hidden"], b["hidden"]) for a, b in zip(first, again, strict=True))


def test_a_pooled_prior_reads_training_answers_as_measuring_reads_their_text(tmp_path, base):
    """The trainer pools the prior's layer along each answer as ``sequence_log_probs`` does from the
    answer's start, so a pooled prior is fitted on what it later reads; the cache keeps the states
    themselves, so one cache serves pooled and unpooled priors."""
    from safetensors.torch import load_file

    from cliper_integrations.core.classifier import PreferenceClassifier, running_mean
    from cliper_integrations.training.trainer import _token_sequence, encode_rows

    classifier = PreferenceClassifier.create(
        base,
        ["concise", "informative"],
        form="bayes",
        class_prior="learned",
        guidance_prior="uniform",
        prior_layer=1,
        prior_pooling="mean",
        head_size=32,
    )
    with torch.no_grad():  # a prior sharp enough that reading the wrong states shows
        classifier.head.prior[-1].weight.mul_(100.0)
    rows = _style_rows(2)
    features = encode_rows(classifier, base, rows, tmp_path / "cache", candidates=8)
    stored = {tuple(load_file(path)["next_ids"].tolist()): load_file(path) for path in (tmp_path / "cache").iterdir()}
    for row, feature in zip(rows, features, strict=True):
        sequence, prompt_length = _token_sequence(base, row)
        ids = torch.tensor([sequence])
        read = classifier.sequence_log_probs(ids, torch.ones_like(ids), top_k=8, answer_start=prompt_length)
        inputs = {
            name: tensor.float() if name in ("hidden", "prior_hidden") else tensor for name, tensor in feature.items()
        }
        torch.testing.assert_close(
            classifier.token_log_probs(**inputs), read[0, prompt_length - 1 :], atol=2e-2, rtol=0
        )
        middle = base.model.model(input_ids=ids, output_hidden_states=True).hidden_states[1][0, prompt_length - 1 : -1]
        kept = stored[tuple(feature["next_ids"].tolist())]["hidden.1"]
        torch.testing.assert_close(kept.float(), middle.detach(), atol=1e-2, rtol=0)
        torch.testing.assert_close(feature["prior_hidden"].float(), running_mean(middle.detach()), atol=1e-2, rtol=0)


def test_refusals_train_a_background_class_that_no_request_may_weight(tmp_path, base):
    from cliper_integrations.core.classifier import PreferenceClassifier
    from cliper_integrations.core.errors import UnknownClassError

    rows = _style_rows(40)
    refusals = ["I'm sorry, but I can't assist with that.", "I cannot help with that request.", "Sorry, I can't."]
    for n in range(40):  # asked to decline, or declining what was asked: either way a refusal
        rows.append({**rows[2 * n], "class": "refusal" if n % 2 else "concise", "response": refusals[n % 3]})
    rows.append({**rows[0], "id": "i77", "class": "refusal", "response": "Paris. Yes. Done."})  # did not decline
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = _tiny_config(data, tmp_path / "clf", classes=("concise", "informative", "refusal"), epochs=40, patience=10)
    metrics = train_classifier(base, config)
    assert metrics["data"]["per_class"]["refusal"] == 40
    assert metrics["data"]["refusal_requests_answered_dropped"] == 1 and metrics["data"]["refusals_dropped"] == 0
    loaded = PreferenceClassifier.load(config.output, base)
    assert loaded.classes == ["concise", "informative", "refusal"]
    # the refusal's opening token belongs to the background class, so no requested class is rewarded for it
    scores = _first_token_posteriors(loaded, base, "Question 7?", ["I", "Paris."])
    assert scores[0].argmax() == 2 and scores[1].argmax() == 0
    engine = CLIPerEngine(base, classifier=loaded)
    assert engine.classes == ("concise", "informative")
    with pytest.raises(UnknownClassError, match="background"):
        engine.generate("Question 7?", weights={"refusal": 1})
    assert set(engine.measure_style("Paris.", prompt="Question 7?")) == {"concise", "informative"}
    # without refusals in the data the background class is left out: untrained, it would skew every posterior
    data.write_text("".join(json.dumps(r) + "\n" for r in _style_rows(40)))
    metrics = train_classifier(base, TrainConfig(**{**config.__dict__, "output": tmp_path / "plain", "epochs": 1}))
    assert PreferenceClassifier.load(tmp_path / "plain", base).classes == ["concise", "informative"]


def test_training_batches_hold_whole_responses_once_each():
    from cliper_integrations.training.trainer import EncodedSet, _response_batches

    lengths = torch.tensor([3, 1, 5, 2, 4])
    response = torch.repeat_interleave(torch.arange(5), lengths)
    data = EncodedSet({}, torch.zeros(len(response), dtype=torch.long), response, torch.zeros(5, dtype=torch.long))
    batches = _response_batches(data, 4, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(batches).tolist()) == list(range(len(response)))  # every row, once
    for batch in batches:
        assert len(batch) >= 4 or batch is batches[-1]
        for index in response[batch].unique():  # a response is never split across batches
            assert (response[batch] == index).sum() == lengths[index]
    again = _response_batches(data, 4, torch.Generator().manual_seed(0))
    assert [b.tolist() for b in again] == [b.tolist() for b in batches]  # seeded


def test_a_teacher_reads_the_prompted_base_model_and_pulls_the_head_towards_it(tmp_path, base):
    """The teacher's targets are the base model's own next-token log-probs with the class's request in the
    prompt, at the answer's positions (checked against a plain forward pass), only on the teacher classes'
    axis; training with the teacher lowers the head's divergence from them."""
    from cliper_integrations.core.prompting import instruction_text, render_chat, with_preference_request
    from cliper_integrations.training.trainer import encode_rows, load_rows, teach_rows

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _style_rows(24)))
    settings = {"epochs": 30, "patience": 30, "feature_cache": tmp_path / "features", "contrast_filter": False}
    taught = train_classifier(base, _tiny_config(data, tmp_path / "taught", teacher_classes=("concise",), **settings))
    barely = train_classifier(
        base,
        _tiny_config(data, tmp_path / "barely", teacher_classes=("concise",), teacher_weight=1e-6, **settings),
    )
    assert taught["train"]["teacher_kl"] < barely["train"]["teacher_kl"] - 0.05
    assert taught["train"]["teacher_kl_base"] == barely["train"]["teacher_kl_base"] > 0  # same targets
    assert json.loads((tmp_path / "taught" / "metrics.json").read_text())["config"]["teacher_classes"] == ["concise"]

    from cliper_integrations.core.classifier import PreferenceClassifier

    classifier = PreferenceClassifier.load(tmp_path / "taught", base)
    rows, _ = load_rows([data], ("concise", "informative"))
    other_axis = {**rows[0], "class": "friendly", "response": "Thanks, friend!"}
    features = encode_rows(classifier, base, [rows[1], other_axis], None, candidates=8)
    teach_rows(classifier, base, [rows[1], other_axis], features, None, ("concise",))
    assert "teacher.concise" not in features[1]  # not on the teacher's axis
    every = encode_rows(classifier, base, [other_axis], None, candidates=8)
    teach_rows(classifier, base, [other_axis], every, None, ("concise",), teacher_answers="all")
    assert every[0]["teacher.concise"].shape == every[0]["candidates"].shape
    row, feature = rows[1], features[0]
    messages = with_preference_request([{"role": "user", "content": instruction_text(row)}], {"concise": 1.0})
    prompt = base.tokenizer(render_chat(base.tokenizer, messages), add_special_tokens=False)["input_ids"]
    answer = base.tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [base.tokenizer.eos_token_id]
    with torch.no_grad():
        logits = base.model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
    expected = torch.log_softmax(logits.float(), -1).gather(-1, feature["candidates"].long())
    assert feature["teacher.concise"].shape == (len(answer), 8)
    assert torch.allclose(feature["teacher.concise"].float(), expected, atol=2e-2)


def test_answers_written_with_no_request_teach_through_the_teacher_alone(tmp_path, base):
    """``unrequested`` rows (the base model's own answers) have no class: with a teacher they join training
    (training side of the split only) and move the head through the teacher term alone (the losses leave
    their positions out); without one they are left out, and the head is the labelled data's alone."""
    from cliper_integrations.core.classifier import PreferenceClassifier

    labelled = _style_rows(24)
    own = [
        {**row, "class": "unrequested", "response": f"{row['response']} and so on"}
        for row in labelled
        if row["class"] == "concise"
    ]
    plain, mixed = tmp_path / "plain.jsonl", tmp_path / "mixed.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in labelled))
    mixed.write_text("".join(json.dumps(r) + "\n" for r in labelled + own))
    settings = {"epochs": 3, "patience": 3, "feature_cache": tmp_path / "features", "contrast_filter": False}
    alone = train_classifier(base, _tiny_config(plain, tmp_path / "alone", **settings))
    unread = train_classifier(base, _tiny_config(mixed, tmp_path / "unread", **settings))
    assert unread["data"]["unrequested_unread_dropped"] == len(own)
    assert unread["data"]["train_unrequested_responses"] == 0 and unread["validation"] == alone["validation"]
    first, second = (PreferenceClassifier.load(tmp_path / run, base) for run in ("alone", "unread"))
    for name, tensor in first.head.state_dict().items():
        torch.testing.assert_close(second.head.state_dict()[name], tensor, rtol=0, atol=0)

    teacher = {**settings, "teacher_classes": ("concise",)}
    train_classifier(base, _tiny_config(plain, tmp_path / "without", **teacher))
    taught = train_classifier(base, _tiny_config(mixed, tmp_path / "taught", **teacher))
    validation_side = len(split_by_instruction(own, 0.15, 0)[1])
    assert 0 < taught["data"]["train_unrequested_responses"] == len(own) - validation_side
    assert taught["data"].get("unrequested_unread_dropped", 0) == validation_side
    assert "unrequested" not in taught["data"]["per_class"]
    assert all(math.isfinite(epoch["val_loss"]) for epoch in taught["history"])
    heads = [PreferenceClassifier.load(tmp_path / run, base).head.state_dict() for run in ("without", "taught")]
    assert all(torch.isfinite(tensor).all() for tensor in heads[1].values())
    assert any(not torch.equal(heads[0][name], heads[1][name]) for name in heads[0])


def test_teacher_classes_must_be_trained_classes_on_an_axis(tmp_path):
    with pytest.raises(ValueError, match="Teacher classes"):
        TrainConfig(data=[tmp_path], output=tmp_path, teacher_classes=("refusal",))
    with pytest.raises(ValueError, match="teacher_answers"):
        TrainConfig(data=[tmp_path], output=tmp_path, teacher_answers="some")
    with pytest.raises(ValueError, match="bayes-form"):
        TrainConfig(data=[tmp_path], output=tmp_path, teacher_classes=("friendly",), form="direct")


def test_a_shift_rank_trains_the_heads_bilinear_term_and_is_saved(tmp_path, base):
    from cliper_integrations.core.classifier import PreferenceClassifier

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _style_rows(12)))
    settings = {"epochs": 3, "contrast_filter": False, "shift_rank": 4}
    metrics = train_classifier(base, _tiny_config(data, tmp_path / "shifted", **settings))
    assert metrics["config"]["shift_rank"] == 4
    loaded = PreferenceClassifier.load(tmp_path / "shifted", base)
    assert loaded.config.shift_rank == 4 and loaded.head.shift.weight.abs().sum() > 0  # it left its zero start
    with pytest.raises(ValueError, match="shift_rank"):  # a prior fitted on top keeps the head as it is
        train_classifier(base, _tiny_config(data, tmp_path / "prior", prior_on=tmp_path / "shifted", epochs=1))


def test_a_teacher_on_its_axis_ignores_targets_another_run_cached_for_every_answer(tmp_path, base):
    """The feature cache is shared between runs: answers taught by a ``teacher_answers="all"`` run keep
    their targets there, and a later ``axis`` run must still read the teacher on its own axis only."""
    tone = [
        {**row, "class": pole, "response": text}
        for row in _style_rows(12)[::2]
        for pole, text in (("friendly", "Thanks, friend! That was warm."), ("unfriendly", "Go away. Answer: no."))
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [*_style_rows(12), *tone]))
    settings = {
        "classes": ("concise", "informative", "friendly", "unfriendly"),
        "teacher_classes": ("concise",),
        "epochs": 1,
        "contrast_filter": False,
    }
    shared = tmp_path / "shared-cache"
    every = train_classifier(
        base, _tiny_config(data, tmp_path / "all", teacher_answers="all", feature_cache=shared, **settings)
    )
    after = train_classifier(base, _tiny_config(data, tmp_path / "after", feature_cache=shared, **settings))
    fresh = train_classifier(base, _tiny_config(data, tmp_path / "fresh", feature_cache=tmp_path / "own", **settings))
    assert after["train"]["teacher_kl_base"] == fresh["train"]["teacher_kl_base"]
    assert every["train"]["teacher_kl_base"] != fresh["train"]["teacher_kl_base"]  # the tone answers count there


def test_a_main_joint_prior_keeps_the_main_classes_guidance_and_their_probed_alpha(tmp_path, base):
    """``--posterior main-joint``: the main head's classes still guide exactly as the main head alone, so
    the α probed for them with the prompt carries over; the part's class is read against the background."""
    from cliper_integrations.core.classifier import PreferenceClassifier

    refusals = [
        {
            "id": f"r{n}",
            "instruction": f"Question {n}?",
            "input": "",
            "class": "concise",
            "refusal": True,
            "response": "I'm sorry, but I can't help with that.",
            "truncated": False,
            "model": "tiny",
        }
        for n in range(30)
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [*_style_rows(30), *refusals]))
    cache, classes = tmp_path / "features", ("concise", "informative", "refusal")
    main = _tiny_config(data, tmp_path / "main", epochs=3, feature_cache=cache, classes=classes)
    donor = _tiny_config(data, tmp_path / "donor", epochs=2, feature_cache=cache, classes=classes, seed=5)
    train_classifier(base, main)
    train_classifier(base, donor)
    probed = json.loads((main.output / "classifier.json").read_text())
    factors = {"concise": 0.25, "informative": 0.5}
    floors = {"concise": 0.3, "informative": 0.3}
    sparing = {"unprompted_favourite_ngrams": {"concise": None, "informative": None}}
    (main.output / "classifier.json").write_text(
        json.dumps({**probed, "prompted_weight_factors": factors, "plausibility_floors": floors, **sparing})
    )
    hybrid_run = _tiny_config(
        data,
        tmp_path / "hybrid",
        feature_cache=cache,
        classes=classes,
        prior_on=main.output,
        head_parts_from=[(("informative",), donor.output)],
        guidance_prior="uniform",
        posterior="main-joint",
        epochs=3,
    )
    metrics = train_classifier(base, hybrid_run)
    hybrid = PreferenceClassifier.load(hybrid_run.output, base)
    assert hybrid.config.posterior == "main-joint" and hybrid.config.shadowed_classes == ["informative"]
    assert hybrid.guidance_digest(["concise"]) == PreferenceClassifier.load(main.output, base).guidance_digest(
        ["concise"]
    )
    assert hybrid.guidance_digest(["informative"]) != hybrid.guidance_digest(["concise"])
    assert hybrid.config.prompted_weight_factors == {"concise": 0.25}
    assert hybrid.config.plausibility_floors == {"concise": 0.3}  # the donor's informative was not probed
    assert hybrid.config.unprompted_favourite_ngrams == {"concise": None}
    assert metrics["validation"]["response_accuracy"] >= 0.9
    # a reading prior on a middle layer, pooled or not, leaves the main head's guidance alone
    for pooling in ("last", "mean"):
        layered = {"output": tmp_path / pooling, "prior_layer": 1, "prior_pooling": pooling}
        train_classifier(base, TrainConfig(**{**hybrid_run.__dict__, **layered}))
        read = PreferenceClassifier.load(tmp_path / pooling, base)
        assert read.guidance_digest(["concise"]) == hybrid.guidance_digest(["concise"])
    # a part for both poles of which concise keeps the main head's guidance, and so its probed settings
    pole_run = TrainConfig(
        **{
            **hybrid_run.__dict__,
            "output": tmp_path / "pole",
            "head_parts_from": [(("concise", "informative"), donor.output)],
            "main_guided_classes": ("concise",),
        }
    )
    train_classifier(base, pole_run)
    pole = PreferenceClassifier.load(pole_run.output, base)
    assert pole.config.head_parts == [["concise", "informative"]] and pole.config.main_guided_classes == ["concise"]
    assert pole.guidance_digest(["concise"]) == hybrid.guidance_digest(["concise"])
    assert pole.guidance_digest(["informative"]) != hybrid.guidance_digest(["informative"])
    assert pole.config.prompted_weight_factors == {"concise": 0.25}
    with pytest.raises(ValueError, match="main-joint"):
        TrainConfig(**{**pole_run.__dict__, "posterior": "part"})


def _train_main_and_donor(tmp_path: Path, base) -> tuple[Path, Path, TrainConfig, TrainConfig]:
    """Style data, a shared feature cache and two trained heads (the second seeded apart, to lend a part)."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _style_rows(30)))
    cache = tmp_path / "features"
    main = _tiny_config(data, tmp_path / "main", epochs=3, feature_cache=cache)
    donor = _tiny_config(data, tmp_path / "donor", epochs=2, feature_cache=cache, seed=5)
    train_classifier(base, main)
    train_classifier(base, donor)
    return data, cache, main, donor


def test_a_borrowed_prior_reads_a_new_head_part_as_it_read_the_old_head(tmp_path, base):
    """``prior_from`` with ``epochs`` 0: the composed heads guide as composed, and the prior is the donor's
    exactly, so the classes the old head still scores are read as the donor read them."""
    from cliper_integrations.core.classifier import PreferenceClassifier, compose

    data, cache, main, donor = _train_main_and_donor(tmp_path, base)
    read = _tiny_config(data, tmp_path / "read", feature_cache=cache, prior_on=main.output, guidance_prior="uniform")
    train_classifier(base, read)
    composed = _tiny_config(
        data,
        tmp_path / "composed",
        feature_cache=tmp_path / "read_only",
        prior_on=main.output,
        head_parts_from=[(("informative",), donor.output)],
        prior_from=read.output,
        guidance_prior="uniform",
        epochs=0,
    )
    metrics = train_classifier(base, composed)
    # nothing trains at 0 epochs, so only the validation answers were encoded
    assert metrics["train"] is None and metrics["data"]["train_tokens"] is None
    encoded = len(list((tmp_path / "read_only").iterdir()))
    assert 0 < encoded < metrics["data"]["train_responses"]
    with pytest.raises(ValueError, match="No answers left to train on"):  # every instruction in validation
        train_classifier(base, TrainConfig(**{**composed.__dict__, "epochs": 1, "val_fraction": 1.0}))
    reader, borrowed = (PreferenceClassifier.load(run.output, base) for run in (read, composed))
    for name, tensor in reader.head.prior.state_dict().items():
        torch.testing.assert_close(borrowed.head.prior.state_dict()[name], tensor, rtol=0, atol=0)
    assert borrowed.config.head_parts == [["informative"]] and metrics["history"] == []
    assert metrics["config"]["prior_from"] == str(read.output)
    expected = compose(
        PreferenceClassifier.load(main.output, base), [(["informative"], PreferenceClassifier.load(donor.output, base))]
    )
    assert borrowed.guidance_digest() == expected.guidance_digest() != reader.guidance_digest()
    # a prior of another layer (or none) is refused, as is a borrowed prior without a head to put it on
    other_layer = TrainConfig(**{**read.__dict__, "output": tmp_path / "layer", "prior_layer": 1, "epochs": 1})
    train_classifier(base, other_layer)
    with pytest.raises(ValueError, match="prior-from"):
        train_classifier(base, TrainConfig(**{**composed.__dict__, "prior_from": other_layer.output}))
    # ... so is one that reads the same layer pooled otherwise
    pooled = TrainConfig(**{**other_layer.__dict__, "output": tmp_path / "pooled", "prior_pooling": "mean"})
    train_classifier(base, pooled)
    on_layer = {**composed.__dict__, "output": tmp_path / "on_layer", "prior_layer": 1}
    train_classifier(base, TrainConfig(**{**on_layer, "prior_from": other_layer.output}))
    with pytest.raises(ValueError, match="prior-from"):
        train_classifier(base, TrainConfig(**{**on_layer, "prior_from": pooled.output}))
    with pytest.raises(ValueError, match="prior-from"):
        train_classifier(base, TrainConfig(**{**composed.__dict__, "prior_from": main.output}))
    with pytest.raises(ValueError, match="prior-on"):
        _tiny_config(data, tmp_path / "none", prior_from=read.output)


def test_a_prior_fitted_on_composed_heads_keeps_each_parts_likelihood(tmp_path, base):
    """``prior_on`` with ``head_parts_from``: a class named there is scored by that classifier's head, the
    rest by ``prior_on``'s, both frozen; only the prior trains, and guidance is the composed heads'."""
    from cliper_integrations.core.classifier import PreferenceClassifier, compose

    data, cache, main, donor = _train_main_and_donor(tmp_path, base)
    probed = json.loads((main.output / "classifier.json").read_text())
    (main.output / "classifier.json").write_text(json.dumps({**probed, "prompted_weight_factors": {"concise": 0.25}}))
    parts = [(("informative",), donor.output)]
    prior = _tiny_config(
        data,
        tmp_path / "prior",
        feature_cache=cache,
        prior_on=main.output,
        head_parts_from=parts,
        guidance_prior="uniform",
        epochs=3,
    )
    metrics = train_classifier(base, prior)
    fitted = PreferenceClassifier.load(prior.output, base)
    expected = compose(
        PreferenceClassifier.load(main.output, base), [(["informative"], PreferenceClassifier.load(donor.output, base))]
    )
    assert fitted.config.head_parts == [["informative"]] and fitted.config.class_prior == "learned"
    assert fitted.guidance_digest() == expected.guidance_digest()
    likelihood = {name: t for name, t in expected.head.state_dict().items() if not name.startswith("prior.")}
    for name, tensor in likelihood.items():
        torch.testing.assert_close(fitted.head.state_dict()[name], tensor, rtol=0, atol=0)
    assert metrics["validation"]["response_accuracy"] >= 0.9
    assert fitted.config.prompted_weight_factors == {}  # probed for the main head's guidance, not this one's
    # the composed likelihoods may be read under another posterior
    axis = TrainConfig(**{**prior.__dict__, "output": tmp_path / "axis", "posterior": "axis", "epochs": 1})
    train_classifier(base, axis)
    by_axis = PreferenceClassifier.load(axis.output, base)
    assert by_axis.config.posterior == "axis" and by_axis.guidance_digest() != fitted.guidance_digest()
    with pytest.raises(ValueError, match="prior-on"):
        _tiny_config(data, tmp_path / "none", head_parts_from=parts)
