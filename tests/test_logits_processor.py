"""Each required property of ClassifierGuidedLogitsProcessor, on tiny random models."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from cliper_integrations.core.logits_processor import ClassifierGuidedLogitsProcessor
from cliper_integrations.core.prompting import render_chat


def prompt_batch(base, prompts):
    """Left-padded ids and mask for chat prompts."""
    tokenizer = base.tokenizer
    ids = [tokenizer(render_chat(tokenizer, [{"role": "user", "content": p}]))["input_ids"] for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    return input_ids, mask


def next_scores(base, input_ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return base.model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits[:, -1]


def weights(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def floored_friendly(classifier, mask, top_k, end, **options):
    """Two rows guided towards friendly at α 2 under a plausibility floor of 0.1, ``end`` their one end-of-turn
    token (the ending floor tests' processor; ``options`` add e.g. ``ending_weights``)."""
    return ClassifierGuidedLogitsProcessor(
        classifier,
        weights([0, 0, 0, 0, 2, 0], [0, 0, 0, 0, 2, 0]),
        mask,
        top_k=top_k,
        always_include=[end],
        incremental=False,
        plausibility=0.1,
        **options,
    )


class Recorder:
    """Wraps a processor in ``generate`` and keeps each step's inputs and outputs."""

    def __init__(self, processor):
        self.processor, self.steps = processor, []

    def __call__(self, input_ids, scores):
        out = self.processor(input_ids, scores)
        self.steps.append((input_ids.clone(), scores.clone(), out.clone()))
        return out


def test_zero_weights_return_the_unguided_logits_exactly(base, classifier):
    input_ids, mask = prompt_batch(base, ["Explain rain", "Hi"])
    scores = next_scores(base, input_ids, mask)
    processor = ClassifierGuidedLogitsProcessor(classifier, torch.zeros(2, 6), mask, top_k=None)
    assert torch.equal(processor(input_ids, scores), scores)
    mixed = ClassifierGuidedLogitsProcessor(classifier, weights([0] * 6, [0, 0, 3, 0, 0, 0]), mask, top_k=8)
    out = mixed(input_ids, scores)
    assert torch.equal(out[0], scores[0])
    assert not torch.allclose(out[1], torch.log_softmax(scores[1], -1))


@pytest.mark.parametrize("top_k", [None, 8])
def test_each_row_depends_only_on_its_own_weights(base, classifier, top_k):
    input_ids, mask = prompt_batch(base, ["Explain rain", "Hi there", "Paris?"])
    scores = next_scores(base, input_ids, mask)
    first = ClassifierGuidedLogitsProcessor(
        classifier, weights([2, 0, 0, 0, 0, 0], [0, 0, 5, 0, 0, 0], [0] * 6), mask, top_k=top_k
    )(input_ids, scores)
    second = ClassifierGuidedLogitsProcessor(
        classifier, weights([2, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 9], [1, 1, 1, 1, 1, 1]), mask, top_k=top_k
    )(input_ids, scores)
    torch.testing.assert_close(first[0], second[0], rtol=0, atol=1e-6)
    assert not torch.allclose(first[1], second[1])
    assert not torch.allclose(first[2], second[2])


def test_guidance_follows_the_formula(base, classifier):
    input_ids, mask = prompt_batch(base, ["Explain rain"])
    scores = next_scores(base, input_ids, mask)
    alpha = weights([0.5, 0, 2, 0, 1, 0])
    out = ClassifierGuidedLogitsProcessor(classifier, alpha, mask, top_k=None, incremental=False)(input_ids, scores)
    from cliper_integrations.core.classifier import BackboneState

    hidden = classifier.prefix_hidden(BackboneState(incremental=False), input_ids, mask)
    log_lm = torch.log_softmax(scores, -1)
    log_cls = classifier.log_probs(hidden, None, log_lm)[:, : scores.shape[-1]]
    expected = torch.log_softmax(log_lm + (log_cls * alpha[:, None]).sum(-1), -1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(out.exp().sum(-1), torch.ones(1))


def test_a_negative_weight_steers_away_and_two_opposed_poles_read_their_likelihood_ratio(base, bayes_classifier):
    """α_c < 0 is the same formula with its sign; at ±α on two classes the bayes form's bonus is α times the
    log-ratio of their likelihoods (the posteriors' normaliser cancels), and the row counts as guided though
    its weights sum to zero."""
    from cliper_integrations.core.classifier import BackboneState

    input_ids, mask = prompt_batch(base, ["Explain rain"])
    scores = next_scores(base, input_ids, mask)
    alpha = weights([0, 0, 0, 0, 3, -3])
    out = ClassifierGuidedLogitsProcessor(bayes_classifier, alpha, mask, top_k=None, incremental=False)(
        input_ids, scores
    )
    hidden = bayes_classifier.prefix_hidden(BackboneState(incremental=False), input_ids, mask)
    log_lm = torch.log_softmax(scores, -1)
    log_cls = bayes_classifier.log_probs(hidden, None, log_lm)[:, : scores.shape[-1]]
    torch.testing.assert_close(out, torch.log_softmax(log_lm + 3 * (log_cls[..., 4] - log_cls[..., 5]), -1))
    likelihood_ratio = bayes_classifier.candidate_log_likelihoods(hidden, torch.arange(scores.shape[-1])[None], log_lm)
    ratio = likelihood_ratio[..., 4] - likelihood_ratio[..., 5]
    torch.testing.assert_close(out, torch.log_softmax(log_lm + 3 * ratio, -1), rtol=1e-4, atol=1e-4)
    away = (log_cls[..., 5] - log_cls[..., 4])[0]
    assert (out - log_lm)[0, away.argmax()] < (out - log_lm)[0, away.argmin()]


@pytest.mark.parametrize("top_k", [None, 8])
def test_ending_weights_move_only_the_end_tokens_by_their_term_against_the_written_tokens_expected_term(
    base, bayes_classifier, top_k
):
    """The end-of-turn tokens gain e(end) − Σ_y q(y) e(y) (e: the ending weights' term, q: the base model
    over the scored written tokens); the written tokens keep ``weights``' scores, so only the odds of ending
    move, and a row without ending weights is as without the option."""
    from cliper_integrations.core.classifier import BackboneState

    input_ids, mask = prompt_batch(base, ["Explain rain", "Hi there"])
    scores = next_scores(base, input_ids, mask)
    ends = [3, 5]
    alpha, ending = weights([0, 0, 0, 0, 2, 0], [0, 0, 0, 0, 2, 0]), weights([0, 0, 0, 0, 0, -4], [0] * 6)
    make = functools.partial(
        ClassifierGuidedLogitsProcessor,
        bayes_classifier,
        alpha,
        mask,
        top_k=top_k,
        always_include=ends,
        incremental=False,
    )
    plain, out = make()(input_ids, scores), make(ending_weights=ending)(input_ids, scores)
    scored = torch.isfinite(plain[0]).nonzero().squeeze(-1)
    written = scored[~torch.isin(scored, torch.tensor(ends))]
    hidden = bayes_classifier.prefix_hidden(BackboneState(incremental=False), input_ids[:1], mask[:1])
    log_lm = torch.log_softmax(scores[:1], -1)
    log_cls = bayes_classifier.log_probs(hidden, scored[None], log_lm[:, scored])[0]
    term = dict(zip(scored.tolist(), (-4 * log_cls[:, 5]).tolist(), strict=True))
    q = torch.softmax(log_lm[0, written], -1)
    expected_term = float((q * torch.tensor([term[t] for t in written.tolist()])).sum())
    shift = out[0] - plain[0]  # log-softmax moves every token by the same constant, ends aside
    constant = shift[written]
    torch.testing.assert_close(constant, constant[:1].expand_as(constant), rtol=0, atol=1e-5)
    for end in ends:
        torch.testing.assert_close(shift[end] - constant[0], torch.tensor(term[end] - expected_term), atol=1e-4, rtol=0)
    assert any(abs(term[end] - expected_term) > 1e-3 for end in ends)  # the term moved something
    assert torch.equal(out[1], plain[1])


@pytest.mark.parametrize("top_k", [None, 8])
def test_a_row_that_weighs_ending_measures_its_floor_from_its_best_written_token(base, bayes_classifier, top_k):
    """Where the base model is sure of ending, the floor measured from the end-of-turn token leaves it alone;
    a row with ending weights keeps the written tokens within the floor of its best written one, and a row
    without them in the same batch keeps the usual floor."""
    input_ids, mask = prompt_batch(base, ["Explain rain", "Hi there"])
    scores = next_scores(base, input_ids, mask)
    end = 3
    scores[:, end] = scores.max() + 30.0  # the base model all but certain of ending
    ending = weights([0, 0, 0, 0, 0, -4], [0] * 6)
    plain = floored_friendly(bayes_classifier, mask, top_k, end)(input_ids, scores)
    out = floored_friendly(bayes_classifier, mask, top_k, end, ending_weights=ending)(input_ids, scores)
    assert torch.isfinite(plain[0]).nonzero().squeeze(-1).tolist() == [end]
    log_lm = torch.log_softmax(scores[0], -1)
    written = torch.cat([log_lm[:end], log_lm[end + 1 :]])
    kept = torch.isfinite(out[0]).nonzero().squeeze(-1).tolist()
    assert end in kept and len(kept) > 1
    assert all(log_lm[token] >= written.max() + math.log(0.1) - 1e-5 for token in kept if token != end)
    assert torch.equal(out[1], plain[1])


def test_rejects_malformed_ending_weights(base, shared_classifier):
    _, mask = prompt_batch(base, ["Hi"])
    for bad in (torch.zeros(1, 5), torch.zeros(2, 6), torch.tensor([[float("nan")] * 6])):
        with pytest.raises(ValueError, match="ending_weights"):
            ClassifierGuidedLogitsProcessor(shared_classifier, torch.zeros(1, 6), mask, ending_weights=bad)


@pytest.mark.parametrize("top_k", [None, 8])
def test_incremental_state_matches_recomputing_from_scratch(base, classifier, top_k):
    input_ids, mask = prompt_batch(base, ["Explain rain to a child", "Hi"])
    alpha = weights([1, 0, 2, 0, 0, 0], [0, 3, 0, 0, 0, 1])
    incremental = Recorder(ClassifierGuidedLogitsProcessor(classifier, alpha, mask, top_k=top_k))
    tap = classifier.tap(base.model) if classifier.kind == "shared" else torch.no_grad()
    with tap:
        base.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=8,
            do_sample=False,
            logits_processor=[incremental],
            pad_token_id=base.tokenizer.pad_token_id,
            eos_token_id=[],
        )
    assert len(incremental.steps) == 8
    scratch = ClassifierGuidedLogitsProcessor(classifier, alpha, mask, top_k=top_k, incremental=False)
    for step_ids, step_scores, step_out in incremental.steps:
        expected = scratch(step_ids, step_scores)
        finite = torch.isfinite(expected)
        assert torch.equal(finite, torch.isfinite(step_out))
        torch.testing.assert_close(step_out[finite], expected[finite], rtol=1e-4, atol=1e-4)


def test_top_k_mode_agrees_with_full_vocabulary_on_the_candidates(base, classifier):
    input_ids, mask = prompt_batch(base, ["Explain rain", "Hi there"])
    scores = next_scores(base, input_ids, mask)
    alpha = weights([1, 0, 2, 0, 0, 0], [0, 0, 0, 4, 0, 0])
    full = ClassifierGuidedLogitsProcessor(classifier, alpha, mask, top_k=None)(input_ids, scores)
    top = ClassifierGuidedLogitsProcessor(classifier, alpha, mask, top_k=10, always_include=[3])(input_ids, scores)
    from cliper_integrations.core.classifier import BackboneState

    hidden = classifier.prefix_hidden(BackboneState(incremental=False), input_ids, mask)
    log_lm = torch.log_softmax(scores, -1)
    for row in range(2):
        candidates = torch.isfinite(top[row]).nonzero().squeeze(-1)
        assert len(candidates) == 11 and 3 in candidates.tolist()
        assert set(scores[row].topk(10).indices.tolist()) <= set(candidates.tolist())
        if classifier.config.form == "direct":  # p_cls(c | prefix, x) does not depend on the other candidates
            expected = torch.log_softmax(full[row, candidates], -1)
        else:  # the bayes normaliser runs over the candidates themselves
            log_cls = classifier.log_probs(hidden[row : row + 1], candidates[None], log_lm[row, candidates][None])[0]
            expected = torch.log_softmax(log_lm[row, candidates] + (log_cls * alpha[row]).sum(-1), -1)
        torch.testing.assert_close(top[row, candidates], expected, rtol=1e-5, atol=1e-5)


def test_top_k_masking_keeps_greedy_choice_for_small_weights(base, classifier):
    input_ids, mask = prompt_batch(base, ["Explain rain", "Hi there", "Paris?"])
    scores = next_scores(base, input_ids, mask)
    small = torch.full((3, 6), 1e-3)
    full = ClassifierGuidedLogitsProcessor(classifier, small, mask, top_k=None)(input_ids, scores)
    top = ClassifierGuidedLogitsProcessor(classifier, small, mask, top_k=4)(input_ids, scores)
    assert torch.equal(full.argmax(-1), scores.argmax(-1))
    assert torch.equal(top.argmax(-1), scores.argmax(-1))


@pytest.mark.parametrize("alpha", [1e4, 1e30, 1e38])
def test_no_row_becomes_all_inf_or_nan(base, classifier, alpha):
    input_ids, mask = prompt_batch(base, ["Explain rain", "Hi there"])
    scores = next_scores(base, input_ids, mask)
    scores[0, 5:] = float("-inf")  # an earlier processor left only five tokens in row 0
    for top_k in (None, 8):
        out = ClassifierGuidedLogitsProcessor(classifier, torch.full((2, 6), alpha), mask, top_k=top_k)(
            input_ids, scores
        )
        assert not torch.isnan(out).any()
        assert torch.isfinite(out).any(dim=-1).all()


def test_rejects_malformed_weights(base, shared_classifier):
    _, mask = prompt_batch(base, ["Hi"])
    for bad in (torch.zeros(1, 5), torch.tensor([[float("nan")] * 6]), torch.tensor([[-float("inf")] + [0] * 5])):
        with pytest.raises(ValueError):
            ClassifierGuidedLogitsProcessor(shared_classifier, bad, mask)


def test_guided_rows_never_repeat_an_ngram_of_their_generated_text(base, classifier):
    input_ids, mask = prompt_batch(base, ["Explain rain", "Explain rain"])
    a, b, c = 11, 12, 13
    prompt_with_trigram = input_ids.clone()
    prompt_with_trigram[:, -3:] = torch.tensor([a, b, c])  # in the prompt: does not count
    generated = torch.tensor([[a, b, c, 14, a, b]] * 2)
    ids = torch.cat([prompt_with_trigram, generated], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(generated)], dim=1)
    scores = next_scores(base, ids, full_mask)
    guard = ClassifierGuidedLogitsProcessor(
        classifier, weights([0] * 6, [0, 0, 3, 0, 0, 0]), mask, top_k=None, no_repeat_ngram=3, incremental=False
    )
    out = guard(ids, scores)
    assert torch.equal(out[0], scores[0])  # the unguided row is left alone
    assert out[1, c] == float("-inf")  # "a b c" was generated once: c may not follow "a b" again
    free = ClassifierGuidedLogitsProcessor(
        classifier, weights([0] * 6, [0, 0, 3, 0, 0, 0]), mask, top_k=None, incremental=False
    )
    unguarded = free(ids, scores)
    assert torch.isfinite(unguarded[1, c])
    assert torch.isfinite(out[1]).sum() == torch.isfinite(unguarded[1]).sum() - 1  # only c is masked
    early = ClassifierGuidedLogitsProcessor(  # the prompt's "a b c" does not count before anything repeats
        classifier, weights([0, 0, 3, 0, 0, 0]), mask[:1], top_k=None, no_repeat_ngram=3, incremental=False
    )
    short = torch.cat([prompt_with_trigram[:1], torch.tensor([[a, b]])], dim=1)
    assert torch.isfinite(early(short, next_scores(base, short, torch.cat([mask[:1], torch.ones(1, 2)], 1)))[0, c])
    with pytest.raises(ValueError, match="at least 2"):
        ClassifierGuidedLogitsProcessor(classifier, weights([0] * 6), mask[:1], no_repeat_ngram=1)


def test_plausibility_floor_keeps_only_tokens_near_the_base_models_best(base, classifier):
    input_ids, mask = prompt_batch(base, ["Explain rain", "Explain rain"])
    scores = next_scores(base, input_ids, mask)
    log_lm = torch.log_softmax(scores, -1)
    end = int(log_lm[1].argmin())  # the least likely token, kept as an "end-of-turn" token
    beta = float((log_lm[1].quantile(0.9) - log_lm[1].max()).exp())  # about a tenth of the tokens pass
    guide = weights([0] * 6, [0, 0, 3, 0, 0, 0])
    out = ClassifierGuidedLogitsProcessor(classifier, guide, mask, top_k=None, always_include=[end], plausibility=beta)(
        input_ids, scores
    )
    assert torch.equal(out[0], scores[0])  # the unguided row is left alone
    plausible = log_lm[1] >= log_lm[1].max() + math.log(beta)
    plausible[end] = True
    assert 1 < plausible.sum() < plausible.numel() / 2
    assert torch.equal(torch.isfinite(out[1]), plausible)
    # Among the plausible tokens the guided distribution is the unfloored one, renormalized.
    free = ClassifierGuidedLogitsProcessor(classifier, guide, mask, top_k=None, always_include=[end])
    unfloored = free(input_ids, scores)[1]
    torch.testing.assert_close(out[1], torch.log_softmax(unfloored.masked_fill(~plausible, float("-inf")), -1))
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="plausibility"):
            ClassifierGuidedLogitsProcessor(classifier, weights([0] * 6), mask[:1], plausibility=bad)


def test_each_row_keeps_its_own_plausibility_floor(base, classifier):
    """Per-row floors: a row with β decodes as under a batch-wide β, a row with None as with no floor."""
    input_ids, mask = prompt_batch(base, ["Explain rain", "Explain rain"])
    scores = next_scores(base, input_ids, mask)
    guide = weights([0, 0, 3, 0, 0, 0], [0, 0, 3, 0, 0, 0])
    beta = float((torch.log_softmax(scores[0], -1).quantile(0.99) - scores[0].log_softmax(-1).max()).exp())

    def guided(plausibility):
        return ClassifierGuidedLogitsProcessor(classifier, guide, mask, top_k=None, plausibility=plausibility)(
            input_ids, scores
        )

    per_row, floored, free = guided([beta, None]), guided(beta), guided(None)
    assert torch.equal(per_row[0], floored[0]) and torch.equal(per_row[1], free[1])
    assert not torch.equal(floored[0], free[0])  # the floor does leave tokens out
    for bad in ([beta], [beta, 0.0]):
        with pytest.raises(ValueError, match="plausibility"):
            ClassifierGuidedLogitsProcessor(classifier, guide, mask, plausibility=bad)


def test_plausibility_is_measured_from_the_best_token_the_loop_guard_allows(base, classifier):
    input_ids, mask = prompt_batch(base, ["Explain rain"])
    a, b, c, end = 11, 12, 13, 3
    generated = torch.tensor([[a, b, c, 14, a, b]])
    ids = torch.cat([input_ids, generated], dim=1)
    scores = next_scores(base, ids, torch.cat([mask, torch.ones_like(generated)], dim=1))
    scores[0, c] = scores.max() + 10  # the base model's clear favourite, but it would repeat "a b c"
    processor = ClassifierGuidedLogitsProcessor(
        classifier,
        weights([0, 0, 3, 0, 0, 0]),
        mask,
        top_k=None,
        always_include=[end],
        no_repeat_ngram=3,
        plausibility=0.5,
        incremental=False,
    )
    out = processor(ids, scores)[0]
    log_lm = torch.log_softmax(scores[0], -1)
    allowed = log_lm.clone()
    allowed[c] = float("-inf")
    expected = log_lm >= allowed.max() + math.log(0.5)
    expected[c], expected[end] = False, True
    assert expected.sum() > 2  # not just the end-of-turn token: the answer is not forced to end
    assert torch.equal(torch.isfinite(out), expected)


def test_each_row_holds_the_base_models_favourite_to_its_own_ngram_and_nothing_else(base, classifier):
    """``favourite_ngrams``: on each row the base model's own most likely token is banned only when it
    would repeat an n-gram of that row's n (None: never), while every other repeating token stays banned by
    the guard's n; rows at the guard's n, or without the option, are guarded as before."""
    a, b, c, d = 11, 12, 13, 15

    def guarded(generated: list[int], favourite_ngrams, rows: int):
        input_ids, mask = prompt_batch(base, ["Explain rain"] * rows)
        tail = torch.tensor([generated] * rows)
        ids = torch.cat([input_ids, tail], dim=1)
        scores = next_scores(base, ids, torch.cat([mask, torch.ones_like(tail)], dim=1))
        scores[:, c] = scores.max() + 10  # the base model's favourite: c, which repeats "a b c"
        guide = torch.tensor([[0.0, 0, 3, 0, 0, 0]] * rows)
        return ClassifierGuidedLogitsProcessor(
            classifier, guide, mask, top_k=None, no_repeat_ngram=3, incremental=False, favourite_ngrams=favourite_ngrams
        )(ids, scores)

    short_repeat = [a, b, c, 14, a, b, d, 16, a, b]  # after "a b", c and d repeat a 3-gram, no 4-gram
    out = guarded(short_repeat, [3, None, 4], 3)
    assert out[0, c] == float("-inf")  # the guard's own n: the favourite is banned like any token
    assert torch.isfinite(out[1, c]) and torch.isfinite(out[2, c])  # spared; no 4-gram repeats
    assert (out[:, d] == float("-inf")).all()  # every other repeating token stays banned
    assert out[1].argmax() == c  # with a margin of 10 nats, α = 3 keeps the favourite
    torch.testing.assert_close(out[0], guarded(short_repeat, None, 3)[0])
    long_repeat = [16, a, b, c, 14, 16, a, b, d, 16, a, b]  # "16 a b c" would repeat a 4-gram, not a 5-gram
    out = guarded(long_repeat, [4, 5], 2)
    assert out[0, c] == float("-inf") and torch.isfinite(out[1, c])
    _, mask = prompt_batch(base, ["Hi"])
    for bad, match in (([None, None], "rows"), ([1], "at least 2")):
        with pytest.raises(ValueError, match=match):
            ClassifierGuidedLogitsProcessor(classifier, torch.zeros(1, 6), mask, favourite_ngrams=bad)


@pytest.mark.parametrize("top_k", [None, 8])
def test_a_row_that_weighs_ending_holds_its_end_tokens_to_the_floor(base, bayes_classifier, top_k):
    """Mid-sentence, where the base model finds ending implausible, a row with ending weights cannot end
    however strongly it weighs ending (a large β once cut answers off mid-word); a row without them in the
    same batch keeps the end-of-turn token exempt, so guidance can still end an answer early."""
    input_ids, mask = prompt_batch(base, ["Explain rain", "Explain rain"])
    scores = next_scores(base, input_ids, mask)
    end = 3
    scores[:, end] = scores.min() - 30.0  # the base model all but sure it does not end here
    ending = weights([0, 0, 0, 0, 0, -64], [0] * 6)
    out = floored_friendly(bayes_classifier, mask, top_k, end, ending_weights=ending)(input_ids, scores)
    assert out[0, end] == float("-inf")
    assert torch.isfinite(out[1, end])
    assert torch.isfinite(out[0]).sum() > 0
