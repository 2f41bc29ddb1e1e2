"""CLIPerEngine on tiny random models: batching, per-row weights, streaming, stops, threads, bad input."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from cliper_integrations.core.engine import (
    DISCLAIMER_WARNING,
    RESTART,
    CLIPerEngine,
    GenerationRequest,
    _TokenQueueStreamer,
)
from cliper_integrations.core.errors import (
    ClassNotInClassifierError,
    EmptyPromptError,
    GenerationTimeoutError,
    InvalidRequestError,
    InvalidWeightError,
    NoClassifierError,
    PromptTooLongError,
    UnknownClassError,
)
from cliper_integrations.core.prompting import as_messages, render_chat
from tests.tiny import HOLD_AT, forwards_when_left, held_forwards, join_streams, tiny_loaded

PROMPTS = ["Explain rain to a child", "Hi", "What is the capital of France?"]


@pytest.fixture
def engine(base, classifier):
    return CLIPerEngine(base, classifier=classifier, top_k=8)


def texts(results):
    return [r.text for r in results]


def count_generate_calls(base, monkeypatch) -> list[int]:
    """The batch size of each ``generate`` call on ``base``'s model, appended as they are made."""
    calls: list[int] = []
    generate = base.model.generate

    def counted(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return generate(*args, **kwargs)

    monkeypatch.setattr(base.model, "generate", counted)
    return calls


def test_zero_weights_reproduce_unguided_output(base, engine):
    plain = CLIPerEngine(base, classifier=None)
    for options in ({}, {"temperature": 0.9, "top_p": 0.8, "seed": 3}):
        unguided = plain.generate_batch([GenerationRequest(p, max_new_tokens=12, **options) for p in PROMPTS])
        zero = engine.generate_batch(
            [GenerationRequest(p, weights={"concise": 0, "friendly": 0}, max_new_tokens=12, **options) for p in PROMPTS]
        )
        assert texts(zero) == texts(unguided)
        assert [r.completion_tokens for r in zero] == [r.completion_tokens for r in unguided]


def test_guidance_changes_output_and_reports_weights(engine):
    unguided = engine.generate(PROMPTS[0], max_new_tokens=12)
    guided = engine.generate(PROMPTS[0], weights={"P2A": 8}, max_new_tokens=12)
    assert guided.text != unguided.text
    assert guided.weights == {"concise": 8.0} and guided.weights_source == "explicit"


def test_plausibility_floor_limits_guidance_to_what_the_base_model_would_write(base, classifier):
    """At a floor of 1, a guided row may only take the base model's own greedy token or end the answer."""
    unguided = CLIPerEngine(base, classifier=None).generate_batch(
        [GenerationRequest(p, max_new_tokens=12) for p in PROMPTS]
    )
    strict = CLIPerEngine(base, classifier=classifier, top_k=8, guided_plausibility=1.0)
    guided = strict.generate_batch([GenerationRequest(p, weights={"expert": 50}, max_new_tokens=12) for p in PROMPTS])
    free = CLIPerEngine(base, classifier=classifier, top_k=8, guided_plausibility=None)
    pushed = free.generate_batch([GenerationRequest(p, weights={"expert": 50}, max_new_tokens=12) for p in PROMPTS])
    for plain, floored in zip(unguided, guided, strict=True):
        assert plain.text.startswith(floored.text)
    assert texts(pushed) != texts(unguided)  # without the floor the same push does change the answers


def test_a_class_floor_binds_only_the_rows_that_weigh_that_class(base, shared_classifier, monkeypatch):
    """``plausibility_floors``: rows guided towards a class with a floor of 1 may only write the base
    model's own greedy tokens, while the other rows of the same call decode as with no floor at all."""
    from cliper_integrations.core.classifier import ClassifierConfig, PreferenceClassifier

    config = ClassifierConfig.model_validate(
        {**shared_classifier.config.model_dump(), "plausibility_floors": {"expert": 1.0}}
    )
    floored = PreferenceClassifier(config, base.model, shared_classifier.head)
    free = CLIPerEngine(base, classifier=shared_classifier, top_k=8, guided_plausibility=None)
    engine = CLIPerEngine(base, classifier=floored, top_k=8, guided_plausibility=None)
    asks = [{"expert": 50}, {"concise": 50}, {"expert": 50, "concise": 50}, {}]
    requests = [GenerationRequest(p, weights=w, max_new_tokens=12) for p in PROMPTS for w in asks]
    calls = count_generate_calls(base, monkeypatch)
    mixed, unfloored = engine.generate_batch(requests), free.generate_batch(requests)
    # rows with different floors share the look-ahead's and the decoding's calls (restarts come after)
    assert calls[:2] == [len(requests)] * 2
    unguided = CLIPerEngine(base, classifier=None).generate_batch(
        [GenerationRequest(p, max_new_tokens=12) for p in PROMPTS]
    )
    for index, (request, result, reference) in enumerate(zip(requests, mixed, unfloored, strict=True)):
        if "expert" in request.weights:
            assert unguided[index // len(asks)].text.startswith(result.text)
        else:
            assert result.text == reference.text
    assert texts(mixed) != texts(unfloored)  # the expert rows were pushed elsewhere without their floor
    assert floored.guidance_digest(["concise"]) == shared_classifier.guidance_digest(["concise"])
    assert floored.guidance_digest(["expert"]) != shared_classifier.guidance_digest(["expert"])
    assert floored.guidance_digest(["expert", "concise"]) != shared_classifier.guidance_digest(["expert", "concise"])


def test_a_setting_s_own_floor_binds_only_that_setting_s_rows(base, shared_classifier):
    """``unprompted_plausibility_floors``: expert rows guided alone may only write the base model's greedy
    tokens, while expert rows that also carry the request in the prompt, in the same call, decode as with
    no floor; their digests tell the settings apart."""
    from cliper_integrations.core.classifier import ClassifierConfig, PreferenceClassifier

    settings = {**shared_classifier.config.model_dump(), "unprompted_plausibility_floors": {"expert": 1.0}}
    floored = PreferenceClassifier(ClassifierConfig.model_validate(settings), base.model, shared_classifier.head)
    free = CLIPerEngine(base, classifier=shared_classifier, top_k=8, guided_plausibility=None)
    engine = CLIPerEngine(base, classifier=floored, top_k=8, guided_plausibility=None)
    requests = [
        GenerationRequest(p, weights={"expert": 50}, preference_prompt=prompted, max_new_tokens=12)
        for p in PROMPTS
        for prompted in (False, True)
    ]
    mixed, unfloored = engine.generate_batch(requests), free.generate_batch(requests)
    unguided = CLIPerEngine(base, classifier=None).generate_batch(
        [GenerationRequest(p, max_new_tokens=12) for p in PROMPTS]
    )
    for index, (request, result, reference) in enumerate(zip(requests, mixed, unfloored, strict=True)):
        if request.preference_prompt:
            assert result.text == reference.text
        else:
            assert unguided[index // 2].text.startswith(result.text)
    assert texts(mixed) != texts(unfloored)  # guided alone, the same push goes elsewhere without the floor
    digest = shared_classifier.guidance_digest
    assert floored.guidance_digest(["expert"], prompted=True) == digest(["expert"], prompted=True)
    assert floored.guidance_digest(["expert"], prompted=False) != digest(["expert"], prompted=False)
    assert floored.guidance_digest(["concise"], prompted=False) == digest(["concise"], prompted=False)
    assert floored.config.setting_floors(False) == {"expert": 1.0} and floored.config.setting_floors(True) == {}


@pytest.mark.parametrize("field", ["unprompted_opposite_factors", "unprompted_ending_opposite_factors"])
def test_an_opposite_factor_weighs_the_other_pole_on_its_class_s_rows_in_its_setting_only(
    base, shared_classifier, monkeypatch, field
):
    """``unprompted_opposite_factors``: expert rows guided alone also weigh elementary at −factor·α (on every
    token; on the decision to end alone with ``unprompted_ending_opposite_factors``), while prompted expert
    rows, concise rows and rows that ask for both poles decode as without it; the digests tell the changed
    guidance apart."""
    from cliper_integrations.core import engine as engine_module
    from cliper_integrations.core.classifier import ClassifierConfig, PreferenceClassifier

    settings = {**shared_classifier.config.model_dump(), field: {"expert": 0.5}}
    opposed = PreferenceClassifier(ClassifierConfig.model_validate(settings), base.model, shared_classifier.head)
    matrices = []
    on_ending = field == "unprompted_ending_opposite_factors"

    class Recording(engine_module.ClassifierGuidedLogitsProcessor):
        def __init__(self, classifier, weights, *args, ending_weights=None, **kwargs):
            matrices.append(ending_weights if on_ending else weights)
            super().__init__(classifier, weights, *args, ending_weights=ending_weights, **kwargs)

    monkeypatch.setattr(engine_module, "ClassifierGuidedLogitsProcessor", Recording)
    asks = [
        ({"expert": 40}, False),
        ({"expert": 40}, True),
        ({"concise": 40}, False),
        ({"expert": 40, "elementary": 4}, False),
    ]
    requests = [
        GenerationRequest(p, weights=w, preference_prompt=prompted, max_new_tokens=12)
        for p in PROMPTS
        for w, prompted in asks
    ]
    results = CLIPerEngine(base, classifier=opposed, top_k=8).generate_batch(requests)
    decoded = matrices[0]  # the opposed engine's one decoding call, every row in it
    plain = CLIPerEngine(base, classifier=shared_classifier, top_k=8).generate_batch(requests)
    assert decoded.shape[0] == len(requests)
    elementary, expert = (shared_classifier.classes.index(name) for name in ("elementary", "expert"))
    for row, (request, result, reference) in enumerate(zip(requests, results, plain, strict=True)):
        opposite_alone = request.weights == {"expert": 40} and not request.preference_prompt
        own = {} if on_ending else request.weights  # the ending weights carry the other pole's alone
        assert decoded[row, elementary] == (-20 if opposite_alone else own.get("elementary", 0))
        assert decoded[row, expert] == own.get("expert", 0)
        assert result.weights == request.weights  # the request's own weights, as asked
        if not opposite_alone:
            assert result.text == reference.text
    if not on_ending:  # the tiny model's greedy path seldom weighs ending: the processor's tests check that term
        assert [r.text for r in results[::4]] != [r.text for r in plain[::4]]
    digest = shared_classifier.guidance_digest
    assert opposed.guidance_digest(["expert"], prompted=False) != digest(["expert"], prompted=False)
    assert opposed.guidance_digest(["expert"], prompted=True) == digest(["expert"], prompted=True)
    assert opposed.guidance_digest(["concise"]) == digest(["concise"])


def test_a_class_that_spares_the_favourite_lets_only_its_rows_repeat_as_the_base_model_does(base, shared_classifier):
    """``unprompted_favourite_ngrams`` null: at a floor of 1 (only the base model's greedy token or the end may
    be written), a row guided towards a sparing class writes the unguided answer however often it
    repeats itself, while a row that also weighs a class that does not spare is turned off the base
    model's path at its first repeat by the loop guard (the stricter guard wins)."""
    from cliper_integrations.core.classifier import ClassifierConfig, PreferenceClassifier

    settings = {"plausibility_floors": {"concise": 1.0}, "unprompted_favourite_ngrams": {"concise": None}}
    config = ClassifierConfig.model_validate({**shared_classifier.config.model_dump(), **settings})
    sparing = PreferenceClassifier(config, base.model, shared_classifier.head)
    engine = CLIPerEngine(base, classifier=sparing, top_k=8, guided_no_repeat_ngram=2, guided_plausibility=None)
    unguided = CLIPerEngine(base, classifier=None).generate_batch(
        [GenerationRequest(p, max_new_tokens=24) for p in PROMPTS]
    )
    asks = [{"concise": 0.05}, {"concise": 0.05, "friendly": 0.05}]  # too weak to pick the end over the favourite
    requests = [GenerationRequest(p, weights=w, max_new_tokens=24) for p in PROMPTS for w in asks]
    results = engine.generate_batch(requests)
    through_repeats = 0
    for index, plain in enumerate(unguided):
        spared, guarded = results[index * len(asks) : (index + 1) * len(asks)]
        assert plain.text.startswith(spared.text)
        if not plain.text.startswith(guarded.text):  # the guard turned the mixed row off a repeat
            through_repeats += spared.text == plain.text
    assert through_repeats  # where the guard fired, the sparing row wrote the base model's repeat
    assert sparing.guidance_digest(["concise"]) != shared_classifier.guidance_digest(["concise"])
    assert sparing.guidance_digest(["friendly"]) == shared_classifier.guidance_digest(["friendly"])


def test_the_favourites_rule_is_the_rows_setting_s(base, shared_classifier):
    """``unprompted_favourite_ngrams`` hold for guidance alone and ``prompted_favourite_ngrams`` with the
    request also in the prompt: a rule named for one setting leaves the other's rows as the guard has them."""
    from cliper_integrations.core.classifier import ClassifierConfig, PreferenceClassifier

    def engine_with(**rules: dict[str, int | None]) -> CLIPerEngine:
        settings = {**shared_classifier.config.model_dump(), "plausibility_floors": {"concise": 1.0}, **rules}
        classifier = PreferenceClassifier(ClassifierConfig.model_validate(settings), base.model, shared_classifier.head)
        return CLIPerEngine(base, classifier=classifier, top_k=8, guided_no_repeat_ngram=2, guided_plausibility=None)

    def answers(engine: CLIPerEngine, prompted: bool) -> list[str]:
        ask = {"weights": {"concise": 0.05}, "preference_prompt": prompted, "max_new_tokens": 24}
        return [result.text for result in engine.generate_batch([GenerationRequest(p, **ask) for p in PROMPTS])]

    plain = engine_with()
    alone = engine_with(unprompted_favourite_ngrams={"concise": None})
    prompted = engine_with(prompted_favourite_ngrams={"concise": None})
    assert answers(alone, True) == answers(plain, True) and answers(prompted, False) == answers(plain, False)
    assert answers(alone, False) != answers(plain, False)  # where the rule holds, it changes the answers
    assert answers(prompted, True) != answers(plain, True)
    digest = plain.classifier.guidance_digest
    assert alone.classifier.guidance_digest(["concise"], prompted=True) == digest(["concise"], prompted=True)
    assert alone.classifier.guidance_digest(["concise"], prompted=False) != digest(["concise"], prompted=False)
    assert alone.classifier.guidance_digest(["concise"]) != digest(["concise"])  # both settings: it differs


def test_a_row_whose_base_model_opens_with_a_refusal_is_left_unguided(base, classifier):
    """Whether to decline is the base model's call: a guided row whose unguided greedy draft "declines"
    is answered as unguided; the other rows of the batch stay guided, and answer as they would without
    the look-ahead (the answer starts from the draft's cache of the prompt)."""
    unguided = CLIPerEngine(base, classifier=None).generate_batch(
        [GenerationRequest(p, max_new_tokens=12) for p in PROMPTS[:3]]
    )
    refused_opening = unguided[0].text[:6]  # stands in for "I'm sorry" in this tiny model's vocabulary
    engine = CLIPerEngine(base, classifier=classifier, declines=lambda draft: draft.startswith(refused_opening))
    requests = [
        GenerationRequest(PROMPTS[0], weights={"expert": 8}, max_new_tokens=12),
        GenerationRequest(PROMPTS[1], weights={"expert": 8}, max_new_tokens=12),
        GenerationRequest(PROMPTS[2], max_new_tokens=12),
    ]
    declined, answered, plain = engine.generate_batch(requests)
    assert declined.text == unguided[0].text and declined.weights == {}
    assert "declines" in declined.weights_source
    assert answered.text != unguided[1].text and answered.weights == {"expert": 8.0}
    assert plain.text == unguided[2].text
    without = CLIPerEngine(base, classifier=classifier, refusal_lookahead=None, declines=engine.declines)
    not_declined, same_answer, _ = without.generate_batch(requests)
    assert not_declined.text != unguided[0].text  # the look-ahead is what kept it
    assert same_answer.text == answered.text


def test_a_row_the_preference_request_makes_decline_is_answered_from_the_plain_questions_opening(base, classifier):
    """Where the request in the prompt, not the question, makes the base model decline ("curt and
    unfriendly" reads to it as a request to be rude), the user still gets an answer: the row starts from
    the base model's opening to the plain question, still asked and guided. Where the plain question
    declines too, the refusal is the base model's call and the row stays unguided; the batch's other rows
    answer as they would alone, and a stream shows what the batch answers."""
    weights = {"expert": 8.0}
    plain = CLIPerEngine(base, classifier=None)
    asked = GenerationRequest(PROMPTS[0], weights=weights, preference_prompt=True, guidance=False, max_new_tokens=12)
    asked_answer, asked_opening = plain.generate(asked).text, plain.generate(replace(asked, max_new_tokens=6)).text
    plain_opening = plain.generate(PROMPTS[0], max_new_tokens=6).text
    assert asked_opening != plain_opening  # stands in for "I'm sorry" that only the request brings on
    requests = [replace(asked, guidance=True), GenerationRequest(PROMPTS[1], weights=weights, max_new_tokens=12)]
    engine = CLIPerEngine(base, classifier=classifier, declines=lambda text: text == asked_opening)
    answered, other = engine.generate_batch(requests)
    assert answered.text.startswith(plain_opening) and answered.text != asked_answer
    assert answered.weights == weights and "preference request" in answered.warnings[0]
    unasked_prompt_tokens = plain.generate(PROMPTS[0], max_new_tokens=1).prompt_tokens
    assert answered.completion_tokens <= 12 and answered.prompt_tokens > unasked_prompt_tokens
    assert other.text == engine.generate(requests[1]).text and not other.warnings
    stream = engine.stream(requests[0])
    assert "".join(stream) == answered.text and stream.result.warnings == answered.warnings
    both = CLIPerEngine(base, classifier=classifier, declines=lambda text: text in (asked_opening, plain_opening))
    declined = both.generate(requests[0])
    assert declined.text == asked_answer and declined.weights == {} and "declines" in declined.weights_source


def test_a_disclaimer_the_base_model_answers_after_is_guided_from_its_longer_draft_and_a_short_one_is_not(
    base, classifier, monkeypatch
):
    """An opening that declines with a disclaimer ("As an AI …") is drafted on to ``disclaimer_lookahead``
    tokens: if the base model is still writing there, it hedges and then answers, so the row is guided from
    those tokens on, in the same ``generate`` call as the batch's other rows; if it has ended, it was a refusal
    and the row stays unguided."""
    weights, lookahead = {"expert": 8.0}, 10
    plain = CLIPerEngine(base, classifier=None)
    prompt = base.tokenizer(render_chat(base.tokenizer, as_messages(PROMPTS[0])), return_tensors="pt")["input_ids"]
    tokens = base.model.generate(prompt, max_new_tokens=24, do_sample=False)[0, prompt.shape[1] :].tolist()
    opening = plain.decode(tokens[:6])  # stands in for "As an AI language model,"
    options = {"classifier": classifier, "declines": lambda text: text == opening, "disclaims": lambda text: True}
    request = GenerationRequest(PROMPTS[0], weights=weights, max_new_tokens=24)
    answered = CLIPerEngine(base, **options, disclaimer_lookahead=lookahead).generate(request)
    assert answered.text.startswith(plain.decode(tokens[:lookahead])) and answered.text != plain.decode(tokens)
    assert answered.weights == weights and f"first {lookahead} tokens" in answered.warnings[0]
    hedging = CLIPerEngine(base, **options, disclaimer_lookahead=lookahead)
    other = GenerationRequest(PROMPTS[1], weights=weights, max_new_tokens=24)
    calls = count_generate_calls(base, monkeypatch)
    together = hedging.generate_batch([other, request, replace(request, max_new_tokens=lookahead - 2)])
    # the look-ahead, the draft past both disclaimers, the hedged row's prompt and draft, one pass for the answers
    assert calls == [3, 2, 1, 2]
    assert [result.text for result in together[:2]] == [hedging.generate(other).text, answered.text]
    cut = together[2]  # the draft holds more than the answer may: it is the answer, asked as the others
    assert cut.text == plain.decode(tokens[: lookahead - 2]) and cut.finish_reason == "length"
    assert cut.prompt_tokens == answered.prompt_tokens and cut.seconds > 0
    every_one_declines = CLIPerEngine(base, **options, disclaimer_lookahead=None).generate(request)
    assert every_one_declines.weights == {} and every_one_declines.text == plain.decode(tokens)
    # the base model ends at token ``end`` (made an end token here), before a look-ahead of end + 2
    end = next(i for i in range(7, 16) if tokens[i] not in tokens[:i])
    short = CLIPerEngine(base, **options, disclaimer_lookahead=end + 2)
    short.eos_token_ids = [*short.eos_token_ids, tokens[end]]
    refused = short.generate(request)
    assert refused.weights == {} and "declines" in refused.weights_source and refused.completion_tokens == end + 1


def test_a_row_finished_from_its_draft_may_be_the_batch_s_longest_prompt(base, classifier):
    """A hedged row whose draft already holds all the answer may have the longest prompt of the batch: the rows
    still to decode (one of them hedged) are then narrower than the look-ahead's cache, cut back to their width,
    and each answers as it would alone."""
    weights, lookahead = {"expert": 8.0}, 10
    plain = CLIPerEngine(base, classifier=None)
    long_prompt = PROMPTS[0] + " Say why, step by step, with examples and a short summary at the end." * 3
    openings = [plain.generate(prompt, max_new_tokens=6).text for prompt in (PROMPTS[0], long_prompt)]
    options = {"classifier": classifier, "declines": lambda text: text in openings, "disclaims": lambda text: True}
    engine = CLIPerEngine(base, **options, disclaimer_lookahead=lookahead)
    requests = [
        GenerationRequest(PROMPTS[1], weights=weights, max_new_tokens=24),
        GenerationRequest(PROMPTS[0], weights=weights, max_new_tokens=24),
        GenerationRequest(long_prompt, weights=weights, max_new_tokens=lookahead - 2),
    ]
    together = engine.generate_batch(requests)
    assert together[2].text == plain.generate(long_prompt, max_new_tokens=lookahead - 2).text
    assert DISCLAIMER_WARNING in together[2].warnings[0] and DISCLAIMER_WARNING in together[1].warnings[0]
    assert [result.text for result in together] == [engine.generate(request).text for request in requests]


def test_a_greedy_stream_shows_the_draft_past_a_disclaimer_as_it_is_made(base, classifier, monkeypatch):
    """Greedy, the answer starts with the base model's draft past a disclaimer however it is judged (guided on
    from it, or, ended within it, a refusal that is the draft itself), so a stream shows the draft as it is
    made rather than after the whole look-ahead, and a refusal is taken from the draft, not decoded again.
    Sampled, the draft is not the answer, and nothing of it is shown. The draft goes on from the look-ahead's
    cache, so the prompt is not read again for it."""
    weights, lookahead = {"expert": 8.0}, 10
    plain = CLIPerEngine(base, classifier=None)
    prompt = base.tokenizer(render_chat(base.tokenizer, as_messages(PROMPTS[0])), return_tensors="pt")["input_ids"]
    tokens = base.model.generate(prompt, max_new_tokens=24, do_sample=False)[0, prompt.shape[1] :].tolist()
    opening = plain.decode(tokens[:6])
    options = {"classifier": classifier, "declines": lambda text: text == opening, "disclaims": lambda text: True}
    engine = CLIPerEngine(base, **options, disclaimer_lookahead=lookahead)
    request = GenerationRequest(PROMPTS[0], weights=weights, max_new_tokens=24)

    def shown_before_restart(request: GenerationRequest) -> list[int]:
        streamer = _TokenQueueStreamer()
        engine._run_group([engine._prepare(request)], streamer)
        items = list(iter(streamer.queue.get_nowait, RESTART))  # up to the first restart
        return [token for chunk in items for token in chunk]

    assert shown_before_restart(request) == tokens[:lookahead]
    assert shown_before_restart(replace(request, temperature=0.7, seed=0)) == []
    assert "".join(engine.stream(request)) == engine.generate(request).text
    reads = []  # tokens read per forward pass: the draft goes on from its own cache, not from its prompt again
    forward = base.model.forward

    def read(**kwargs):
        reads.append(kwargs["input_ids"].shape[1])
        return forward(**kwargs)

    monkeypatch.setattr(base.model, "forward", read)
    engine.generate(request)
    assert sum(length > 1 for length in reads) == 2  # the prompt for the look-ahead, prompt and draft for the answer
    calls = []
    decode = base.model.generate
    monkeypatch.setattr(base.model, "generate", lambda *args, **kwargs: calls.append(1) or decode(*args, **kwargs))
    stop, drafted = plain.decode(tokens[7:9]), plain.decode(tokens[:lookahead])
    stopped = engine.generate(replace(request, stop=[stop]))  # the draft already holds the stop: nothing to decode
    assert stopped.text == drafted[: drafted.index(stop)] and stopped.finish_reason == "stop" and len(calls) == 2
    end = next(i for i in range(7, 9) if tokens[i] not in tokens[:i])  # made an end token: a refusal at ``end``
    engine.eos_token_ids = [*engine.eos_token_ids, tokens[end]]
    calls.clear()
    refused = engine.generate(request)
    assert refused.weights == {} and refused.completion_tokens == end + 1 and len(calls) == 2  # the two drafts
    assert "".join(engine.stream(request)) == refused.text and shown_before_restart(request) == tokens[: end + 1]


def test_a_guided_opening_that_declines_where_the_base_model_does_not_is_answered_from_the_base_opening(
    base, classifier
):
    """Guidance must not turn an answer into a refusal: a guided row that opens with what ``declines``
    where the base model's own opening does not is answered again, still guided, from the base model's
    opening (its first ``refusal_lookahead`` greedy tokens); a stream never shows the declined opening."""
    lookahead = 6
    plain = CLIPerEngine(base, classifier=None)
    free = CLIPerEngine(base, classifier=classifier, top_k=8, refusal_lookahead=None)
    requests = [GenerationRequest(p, weights={"expert": 8}, max_new_tokens=12) for p in PROMPTS]
    unguided = plain.generate_batch([GenerationRequest(p, max_new_tokens=12) for p in PROMPTS])
    guided = free.generate_batch(requests)
    base_opening = plain.generate(PROMPTS[0], max_new_tokens=lookahead).text
    # row 0's guided opening stands in for "I'm sorry" in this tiny model's vocabulary
    refused, other = (r.text for r in free.generate_batch([replace(r, max_new_tokens=lookahead) for r in requests[:2]]))
    assert refused not in (base_opening, other)
    engine = CLIPerEngine(
        base, classifier=classifier, top_k=8, refusal_lookahead=lookahead, declines=lambda text: text == refused
    )
    restarted, untouched, _ = engine.generate_batch(requests)
    assert restarted.text.startswith(base_opening) and restarted.text != unguided[0].text
    assert restarted.weights == {"expert": 8.0} and "answered again" in restarted.warnings[0]
    assert restarted.completion_tokens <= 12 and restarted.prompt_tokens == guided[0].prompt_tokens
    assert untouched.text == guided[1].text and not untouched.warnings
    stream = engine.stream(requests[0])
    deltas = list(stream)
    assert "".join(deltas) == restarted.text and not deltas[0].startswith(refused)
    assert stream.result.warnings == restarted.warnings
    # an answer no longer than its opening is the base model's opening
    short = replace(requests[0], max_new_tokens=3)
    refused_short = free.generate(short).text
    strict = CLIPerEngine(base, classifier=classifier, top_k=8, declines=lambda text: text == refused_short)
    answer = strict.generate(short)
    assert answer.text == plain.generate(PROMPTS[0], max_new_tokens=3).text != refused_short
    assert answer.completion_tokens == 3 and answer.finish_reason == "length" and answer.warnings


def test_rows_of_a_batch_do_not_affect_each_other(engine):
    first = engine.generate_batch(
        [
            GenerationRequest(PROMPTS[0], weights={"expert": 6}, max_new_tokens=10),
            GenerationRequest(PROMPTS[1], weights={"friendly": 6}, max_new_tokens=10),
        ]
    )
    second = engine.generate_batch(
        [
            GenerationRequest(PROMPTS[0], weights={"expert": 6}, max_new_tokens=10),
            GenerationRequest(PROMPTS[1], weights={"unfriendly": 9, "concise": 3}, max_new_tokens=10),
        ]
    )
    assert first[0].text == second[0].text
    assert first[1].text != second[1].text


def test_left_padding_changes_nothing(engine):
    weights = {"elementary": 5}
    alone = engine.generate(PROMPTS[1], weights=weights, max_new_tokens=10)
    batched = engine.generate_batch(
        [
            GenerationRequest(PROMPTS[1], weights=weights, max_new_tokens=10),
            GenerationRequest(PROMPTS[0] * 4, weights={"expert": 2}, max_new_tokens=10),
        ]
    )
    assert batched[0].text == alone.text


def test_sampling_with_a_seed_is_reproducible(engine):
    options = {"weights": {"informative": 3}, "temperature": 0.8, "top_p": 0.9, "seed": 11, "max_new_tokens": 12}
    assert engine.generate(PROMPTS[0], **options).text == engine.generate(PROMPTS[0], **options).text


def test_streamed_text_equals_generated_text(engine):
    for options in ({"weights": {"concise": 4}}, {"stop": ["e"]}, {"stop": ["the capital", "zz"]}, {}):
        whole = engine.generate(PROMPTS[2], max_new_tokens=16, **options)
        stream = engine.stream(PROMPTS[2], max_new_tokens=16, **options)
        assert "".join(stream) == whole.text
        assert stream.result.completion_tokens == whole.completion_tokens


def test_stop_strings_of_any_token_length(base, engine):
    reference = engine.generate(PROMPTS[0], max_new_tokens=24).text
    assert len(reference) > 12
    for stop in (reference[8], reference[5:9], reference[6:14]):
        result = engine.generate(PROMPTS[0], max_new_tokens=24, stop=[stop])
        assert result.text == reference[: reference.find(stop)]
        assert result.finish_reason == "stop"
        assert result.completion_tokens < 24


def test_max_new_tokens_and_usage(base, engine):
    results = engine.generate_batch(
        [GenerationRequest(PROMPTS[0], max_new_tokens=3), GenerationRequest(PROMPTS[0], max_new_tokens=9)]
    )
    prompt_tokens = len(
        base.tokenizer(f"<|im_start|>user\n{PROMPTS[0]}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    )
    assert results[0].completion_tokens <= 3 and results[1].completion_tokens <= 9
    assert results[0].prompt_tokens == results[1].prompt_tokens == prompt_tokens
    if results[0].finish_reason == "length":
        assert results[0].completion_tokens == 3
    assert results[0].total_tokens == results[0].prompt_tokens + results[0].completion_tokens


def test_concurrent_calls_from_threads_match_sequential(engine):
    requests = [
        GenerationRequest(p, weights=w, max_new_tokens=10)
        for p in PROMPTS
        for w in ({}, {"expert": 4}, {"friendly": 3, "concise": 2})
    ]
    sequential = [engine.generate(r).text for r in requests]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda r: engine.generate(r).text, requests))
    assert concurrent == sequential


def test_async_generate_and_stream(engine):
    async def run():
        whole = await engine.agenerate(PROMPTS[0], weights={"expert": 2}, max_new_tokens=10)
        parts = [delta async for delta in engine.astream(PROMPTS[0], weights={"expert": 2}, max_new_tokens=10)]
        return whole.text, "".join(parts)

    whole, streamed = asyncio.run(run())
    assert whole == streamed


LONG = 60


async def cancel_when_held(work: Awaitable, calls: list[int], release: threading.Event) -> None:
    """Run ``work`` as a task, cancel it once decoding has reached the held forward pass (``held_forwards``), then
    let decoding go on."""
    task = asyncio.ensure_future(work)
    while len(calls) < HOLD_AT:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()


@pytest.mark.parametrize("weights", [{}, {"informative": 2}])
def test_a_stream_left_early_stops_decoding(base, shared_classifier, weights):
    """A chat UI's "stop" button or a reader that breaks: the answer is not decoded on to its end behind the next
    request's back (which it slowed to about 0.8 of its speed: docs/performance.md)."""
    engine = CLIPerEngine(base, classifier=shared_classifier, top_k=8)
    options = {"weights": weights, "max_new_tokens": LONG}
    assert engine.generate(PROMPTS[0], **options).completion_tokens == LONG  # else the test would prove nothing
    forwards, first = forwards_when_left(base.model, engine.stream(PROMPTS[0], **options))
    assert first
    assert forwards <= HOLD_AT + 1


def test_an_async_stream_whose_task_is_cancelled_stops_decoding(base):
    """A client that disconnects from an async server: its task is cancelled while it awaits the next delta."""
    engine = CLIPerEngine(base, classifier=None)
    assert engine.generate(PROMPTS[0], max_new_tokens=LONG).completion_tokens == LONG

    async def run(release):
        first = asyncio.Event()

        async def read():
            async for _ in engine.astream(PROMPTS[0], max_new_tokens=LONG):
                first.set()

        task = asyncio.create_task(read())
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()

    with held_forwards(base.model) as (calls, release):
        asyncio.run(run(release))
        join_streams()
    assert len(calls) <= HOLD_AT + 1


def test_a_stream_cancelled_during_a_draft_it_is_not_shown_stops_decoding(base, shared_classifier):
    """A sampled row's draft past a disclaimer is not its answer, so nothing of it is shown: a client that leaves
    while it waits for the first delta stops the draft too, not only the answer after it."""
    plain = CLIPerEngine(base, classifier=None)
    drafted = plain.generate(PROMPTS[0], max_new_tokens=LONG)
    assert drafted.completion_tokens == LONG  # the draft runs its whole length unless stopped
    opening = plain.generate(PROMPTS[0], max_new_tokens=6).text
    engine = CLIPerEngine(
        base,
        classifier=shared_classifier,
        declines=lambda text: text == opening,
        disclaims=lambda text: True,
        disclaimer_lookahead=LONG - 4,
    )
    options = {"weights": {"expert": 8}, "temperature": 0.7, "seed": 0, "max_new_tokens": LONG}

    async def read():
        async for _ in engine.astream(PROMPTS[0], **options):
            pass

    with held_forwards(base.model) as (calls, release):  # held where the look-ahead is done, the draft under way
        asyncio.run(cancel_when_held(read(), calls, release))
        join_streams()
    assert len(calls) <= HOLD_AT + 1


@pytest.mark.parametrize(("batch_window", "rows"), [(0.01, 1), (None, 1), (0.01, 2)], ids=["batcher", "alone", "batch"])
def test_a_cancelled_async_call_stops_decoding(base, batch_window, rows):
    """``asyncio.wait_for``'s timeout, or a client gone from an async server: the call's rows stop at their next
    token instead of decoding to ``max_new_tokens`` on the batch's thread."""
    engine = CLIPerEngine(base, classifier=None, batch_window=batch_window)
    assert engine.generate(PROMPTS[0], max_new_tokens=LONG).completion_tokens == LONG
    requests = [GenerationRequest(PROMPTS[0], max_new_tokens=LONG)] * rows

    answer = engine.agenerate(requests[0]) if rows == 1 else engine.agenerate_batch(requests)
    with held_forwards(base.model) as (calls, release):
        asyncio.run(cancel_when_held(answer, calls, release))  # which waits for its executor's threads (alone)
        engine.generate(PROMPTS[1], max_new_tokens=1)  # batches run one at a time: the cancelled one has ended
    assert len(calls) <= HOLD_AT + 2


def test_a_request_cancelled_from_another_thread_ends_there(base):
    engine = CLIPerEngine(base, classifier=None)
    cancelled = threading.Event()
    other = GenerationRequest(PROMPTS[2], max_new_tokens=LONG // 2)

    with held_forwards(base.model) as (_, release):
        threading.Timer(0.2, lambda: (cancelled.set(), release.set())).start()
        results = engine.generate_batch(
            [GenerationRequest(PROMPTS[0], max_new_tokens=LONG, cancelled=cancelled), other]
        )
    assert results[0].finish_reason == "cancelled" and results[0].completion_tokens <= HOLD_AT + 1
    assert results[1].text == engine.generate(other).text  # the rest of the batch is answered as usual


def test_a_call_past_its_timeout_stops_and_fails_its_own_row(base):
    engine = CLIPerEngine(base, classifier=None)
    other = GenerationRequest(PROMPTS[2], max_new_tokens=8)
    with held_forwards(base.model, release_after=0.3):  # the held step takes past the timeout
        results = engine.generate_batch([GenerationRequest(PROMPTS[0], max_new_tokens=LONG, timeout=0.2), other])
    late = results[0]
    assert isinstance(late.error, GenerationTimeoutError) and isinstance(late.error, TimeoutError)
    assert late.finish_reason == "error" and late.completion_tokens <= HOLD_AT + 1 and late.text
    assert results[1].error is None and results[1].text == engine.generate(other).text
    for ask in (engine.generate, lambda *a, **k: "".join(engine.stream(*a, **k))):
        late_error = pytest.raises(GenerationTimeoutError, match=r"timeout of 0\.2 s")
        with held_forwards(base.model, release_after=0.3), late_error:
            ask(PROMPTS[0], max_new_tokens=LONG, timeout=0.2)
    assert engine.generate(PROMPTS[0], max_new_tokens=LONG, timeout=60).completion_tokens == LONG
    for bad in (0, -1, math.inf, math.nan, "10", True):
        with pytest.raises(InvalidRequestError, match="timeout"):
            engine.generate(PROMPTS[0], timeout=bad)


class NoThreadsExecutor(ThreadPoolExecutor):
    """An event loop's default executor that fails whoever asks it for a thread."""

    def submit(self, *args, **kwargs):
        raise AssertionError("an executor thread was asked for")


def test_async_calls_and_streams_hold_no_executor_thread(engine):
    """Each waiting ``to_thread`` call held one of the loop's few executor threads (min(32, cores + 4)), which the
    application's own blocking work (a sync retriever in an async chain) then waited for."""
    options = {"weights": {"expert": 2}, "max_new_tokens": 10}

    async def collect(prompt):
        return "".join([delta async for delta in engine.astream(prompt, **options)])

    async def run():
        asyncio.get_running_loop().set_default_executor(NoThreadsExecutor())
        streamed = await asyncio.gather(*(collect(prompt) for prompt in PROMPTS))
        answered = await asyncio.gather(*(engine.agenerate(prompt, **options) for prompt in PROMPTS))
        with pytest.raises(UnknownClassError):  # a bad request fails at the first step
            await anext(engine.astream(PROMPTS[0], weights={"verbose": 1}))
        return streamed, [result.text for result in answered]

    streamed, answered = asyncio.run(run())
    assert streamed == answered == [engine.generate(prompt, **options).text for prompt in PROMPTS]


@pytest.mark.parametrize(
    ("weights", "error"),
    [
        ({"verbose": 1}, UnknownClassError),
        ({"concise": -1}, InvalidWeightError),
        ({"concise": math.nan}, InvalidWeightError),
        ({"concise": math.inf}, InvalidWeightError),
        ({"concise": "lots"}, InvalidWeightError),
    ],
)
def test_bad_weights_fail_their_row_only(engine, weights, error):
    good = GenerationRequest(PROMPTS[0], weights={"expert": 2}, max_new_tokens=8)
    results = engine.generate_batch([good, GenerationRequest(PROMPTS[1], weights=weights), good])
    assert isinstance(results[1].error, error) and results[1].finish_reason == "error"
    assert results[0].error is None and results[0].text == results[2].text == engine.generate(good).text
    with pytest.raises(error):
        engine.generate(PROMPTS[1], weights=weights)


def test_empty_prompt_is_refused(engine):
    for prompt in ("", "   ", []):
        with pytest.raises(EmptyPromptError):
            engine.generate(prompt)


def test_weight_for_a_class_the_classifier_lacks(base):
    from cliper_integrations.core.classifier import PreferenceClassifier

    two_class = PreferenceClassifier.create(base, ["concise", "informative"], head_size=8)
    engine = CLIPerEngine(base, classifier=two_class)
    with pytest.raises(ClassNotInClassifierError, match="concise, informative"):
        engine.generate(PROMPTS[0], weights={"friendly": 1})
    assert engine.generate(PROMPTS[0], weights={"P2A": 1}, max_new_tokens=4).weights == {"concise": 1.0}


def test_guidance_without_classifier_says_how_to_get_one(base):
    engine = CLIPerEngine(base, classifier=None)
    with pytest.raises(NoClassifierError, match="cliper train"):
        engine.generate(PROMPTS[0], weights={"concise": 1})
    assert engine.generate(PROMPTS[0], weights={"concise": 0}, max_new_tokens=4).error is None


def test_overlong_prompt_truncates_from_the_left_or_is_refused(tokenizer, shared_classifier):
    small = tiny_loaded("tiny-small-context", seed=0, tokenizer=tokenizer, context=64)
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 20
    engine = CLIPerEngine(small, classifier=None)
    with pytest.warns(UserWarning, match="truncated from the left"):
        result = engine.generate(long_prompt, max_new_tokens=8)
    assert result.prompt_tokens == 56 and result.warnings
    refusing = CLIPerEngine(small, classifier=None, overflow="refuse")
    results = refusing.generate_batch([GenerationRequest(long_prompt), GenerationRequest("Hi", max_new_tokens=4)])
    assert isinstance(results[0].error, PromptTooLongError)
    assert results[1].error is None


def test_preference_prompt_writes_the_request_into_the_prompt(engine):
    plain = engine.generate(PROMPTS[0], weights={"concise": 1}, max_new_tokens=2)
    prompted = engine.generate(PROMPTS[0], weights={"concise": 1}, max_new_tokens=2, preference_prompt=True)
    assert prompted.prompt_tokens > plain.prompt_tokens + 5


def test_system_message_folded_when_template_has_no_system_role(base, shared_classifier):
    from cliper_integrations.core.prompting import render_chat

    tokenizer = base.tokenizer
    original = tokenizer.chat_template
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    try:
        text = render_chat(tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    finally:
        tokenizer.chat_template = original
    assert "Be brief.\n\nHi" in text and "system" not in text


def test_weights_come_from_memory_for_a_known_user(tmp_path, base, shared_classifier):
    from cliper_integrations.core.memory import PreferenceMemory

    memory = PreferenceMemory(f"sqlite:///{tmp_path / 'm.sqlite3'}")
    memory.set("ann", {"concise": 1.0})
    engine = CLIPerEngine(base, classifier=shared_classifier, memory=memory, top_k=8)
    from_memory = engine.generate(PROMPTS[0], user_id="ann", max_new_tokens=8)
    assert from_memory.weights == {"concise": 8.0} and from_memory.weights_source == "memory"
    assert from_memory.text == engine.generate(PROMPTS[0], weights={"concise": 8.0}, max_new_tokens=8).text
    explicit = engine.generate(PROMPTS[0], user_id="ann", weights={"expert": 1}, max_new_tokens=4)
    assert explicit.weights == {"expert": 1.0} and explicit.weights_source == "explicit"
    stranger = engine.generate(PROMPTS[0], user_id="stranger", max_new_tokens=8)
    assert stranger.weights == {} and "no stored preferences" in stranger.weights_source
    assert stranger.text == engine.generate(PROMPTS[0], max_new_tokens=8).text


def test_memory_weights_are_scaled_by_the_classifiers_factors_for_the_setting(tmp_path, base, shared_classifier):
    from cliper_integrations.core.classifier import ClassifierConfig, PreferenceClassifier
    from cliper_integrations.core.memory import PreferenceMemory
    from cliper_integrations.core.prompting import as_messages, with_preference_request

    config = ClassifierConfig.model_validate(
        {
            **shared_classifier.config.model_dump(),
            "prompted_weight_factors": {"concise": 0.25, "expert": 0.5},
            "unprompted_weight_factors": {"friendly": 2.0},
        }
    )
    eased_classifier = PreferenceClassifier(config, base.model, shared_classifier.head)
    memory = PreferenceMemory(f"sqlite:///{tmp_path / 'm.sqlite3'}")
    memory.set("ann", {"concise": 1.0, "friendly": 0.5})
    engine = CLIPerEngine(base, classifier=eased_classifier, memory=memory, top_k=8)

    prompted = engine.generate(PROMPTS[0], user_id="ann", max_new_tokens=8, preference_prompt=True)
    assert prompted.weights == {"concise": 2.0, "friendly": 4.0}
    assert prompted.weights_source == "memory, scaled by the classifier's prompted_weight_factors"
    # The prompt asks for what the user stored (concise first, at strength 1); only guidance eases.
    asked = with_preference_request(as_messages(PROMPTS[0]), {"concise": 8.0, "friendly": 4.0})
    same = engine.generate(asked, weights={"concise": 2.0, "friendly": 4.0}, max_new_tokens=8)
    assert prompted.text == same.text and prompted.prompt_tokens == same.prompt_tokens

    unprompted = engine.generate(PROMPTS[0], user_id="ann", max_new_tokens=4)
    # Without the prompt, the other factors: friendly's guidance alone is pushed twice as hard.
    assert unprompted.weights == {"concise": 8.0, "friendly": 8.0}
    assert unprompted.weights_source == "memory, scaled by the classifier's unprompted_weight_factors"
    explicit = engine.generate(PROMPTS[0], weights={"concise": 8}, max_new_tokens=4, preference_prompt=True)
    assert explicit.weights == {"concise": 8.0} and explicit.weights_source == "explicit"
    memory.set("bob", {"friendly": 1.0})  # no factor for friendly: nothing to ease
    bob = engine.generate(PROMPTS[0], user_id="bob", max_new_tokens=4, preference_prompt=True)
    assert bob.weights == {"friendly": 8.0} and bob.weights_source == "memory"
    # A raised scale stores friendly at 16; its factor 2 may not take it past the strongest α measured ...
    memory.set("cal", {"friendly": 1.0, "scale": 16})
    assert engine.generate(PROMPTS[0], user_id="cal", max_new_tokens=2).weights == {"friendly": 16.0}
    # ... nor cut a weight the profile's raised cap already allows above it.
    memory.set("dee", {"friendly": 1.0, "scale": 20, "cap": 20})
    assert engine.generate(PROMPTS[0], user_id="dee", max_new_tokens=2).weights == {"friendly": 20.0}


@pytest.mark.parametrize(
    ("setting", "values"),
    [
        ("prompted_weight_factors", {"nonsense": 0.5}),
        ("prompted_weight_factors", {"concise": -1.0}),
        ("prompted_weight_factors", {"concise": float("nan")}),
        ("plausibility_floors", {"nonsense": 0.3}),
        ("plausibility_floors", {"concise": 0.0}),
        ("plausibility_floors", {"concise": 1.5}),
        ("plausibility_floors", {"concise": float("nan")}),
        ("unprompted_weight_factors", {"nonsense": 2.0}),
        ("unprompted_weight_factors", {"concise": -1.0}),
        ("unprompted_favourite_ngrams", {"nonsense": None}),
        ("prompted_favourite_ngrams", {"concise": 1}),
    ],
)
def test_per_class_settings_must_name_own_classes_with_sane_values(shared_classifier, setting, values):
    from pydantic import ValidationError

    from cliper_integrations.core.classifier import ClassifierConfig

    with pytest.raises(ValidationError, match=setting):
        ClassifierConfig.model_validate({**shared_classifier.config.model_dump(), setting: values})


def test_measure_style_gives_axis_probabilities(engine):
    style = engine.measure_style("Paris is the capital of France.", prompt="What is the capital of France?")
    assert set(style) == {"elementary", "expert", "concise", "informative", "friendly", "unfriendly"}
    for first, second in (("elementary", "expert"), ("concise", "informative"), ("friendly", "unfriendly")):
        assert abs(style[first] + style[second] - 1) < 1e-5
    with pytest.raises(EmptyPromptError):
        engine.measure_style("")
