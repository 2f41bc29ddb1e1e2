"""Metrics and `cliper eval` on a tiny model (the metrics come from textstat and vaderSentiment)."""

from __future__ import annotations

import importlib.util
import inspect
import json
import math

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("textstat") is None, reason="needs the eval extra")


def test_metrics_move_the_right_way():
    from cliper_integrations.evaluation.metrics import distinct_n, fk_grade, vader_compound, word_count

    assert word_count("one two  three") == 3
    simple, hard = "The cat sat. It was fun.", "Thermodynamic irreversibility necessitates entropic considerations."
    assert fk_grade(hard) > fk_grade(simple) + 5
    assert vader_compound("I love this, it is wonderful!") > 0.5 > -0.5 > vader_compound("This is awful and I hate it.")
    assert distinct_n(["a b a b a b"]) == pytest.approx(2 / 5)
    assert distinct_n(["a b c d"]) == 1.0


@pytest.mark.parametrize("sweep", [True, False])
def test_eval_command_writes_a_report(tmp_path, base, shared_classifier, sweep):
    from typer.testing import CliRunner

    from cliper_integrations.cli import app

    folder = tmp_path / "model"
    base.model.save_pretrained(folder)
    base.tokenizer.save_pretrained(folder)
    classifier = shared_classifier.save(tmp_path / "classifier")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"id": i, "prompt": p} for i, p in enumerate(["Explain rain.", "Hi", "Paris?"])]))
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--prompts",
            str(prompts),
            "--output",
            str(tmp_path / "out"),
            "--limit",
            "2",
            "--max-new-tokens",
            "6",
            "--batch-size",
            "1",
            "--sweep" if sweep else "--no-sweep",
            "--model",
            str(folder),
            "--classifier",
            str(classifier),
        ],
    )
    assert result.exit_code == 0, result.output
    report = (tmp_path / "out" / "results.md").read_text()
    numbers = json.loads((tmp_path / "out" / "results.json").read_text())
    assert numbers["prompts"] == 2
    assert set(numbers["table"]["concise"]) == {"prompt", "guidance", "prompt+guidance"}
    assert "concise+friendly" in numbers["table"] and "| concise | guidance |" in report
    assert "| unfriendly |" in report.split("## Targets")[1]
    assert 0.0 <= numbers["table"]["friendly"]["guidance"]["refusals"] <= 1.0
    concise = numbers["intervals"]["concise"]  # ratios of the words, each holding its figure
    for setting, reference in (("guidance", "unguided"), ("prompt+guidance", "unguided")):
        low, high = concise[setting]
        figure = numbers["table"]["concise"][setting]["words"] / numbers[reference]["words"]
        assert low <= figure + 1e-9 and figure - 1e-9 <= high
    assert "In brackets, a 95% interval" in report and f"[{concise['guidance'][0]:.2f}×, " in report
    plot = tmp_path / "out" / "results_alpha_sweep.png"
    if not sweep:  # no sweep answered, so none plotted or named in the report
        assert numbers["sweep"] == {} and not plot.exists() and "α sweep" not in report
        return
    assert set(numbers["sweep"]["concise"]) == {"0.0", "2.0", "4.0", "8.0", "16.0"}
    assert numbers["sweep"]["concise"]["8.0"] == numbers["table"]["concise"]["guidance"]  # measured once
    assert numbers["sweep"]["concise"]["0.0"] == numbers["unguided"]
    assert plot.stat().st_size > 1000 and "![metrics against α](results_alpha_sweep.png)" in report


def test_eval_measures_the_classes_asked_for_and_counts_answers_cut_off(tmp_path, base, shared_classifier):
    """``--classes`` measures those classes and their combinations only; every answer records whether it
    ran out of new tokens, and a setting's ``cut_off`` is that share (unknown for records made before)."""
    from typer.testing import CliRunner

    from cliper_integrations.cli import app
    from cliper_integrations.evaluation.steering import summarize

    folder = tmp_path / "model"
    base.model.save_pretrained(folder)
    base.tokenizer.save_pretrained(folder)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"id": i, "prompt": p} for i, p in enumerate(["Explain rain.", "Hi"])]))
    options = ["eval", "--prompts", str(prompts), "--output", str(tmp_path / "out"), "--no-sweep"]
    options += ["--max-new-tokens", "4", "--model", str(folder)]
    options += ["--classifier", str(shared_classifier.save(tmp_path / "classifier"))]
    unknown = CliRunner().invoke(app, [*options, "--classes", "concise,cheerful"])
    assert unknown.exit_code != 0 and "cheerful" in unknown.output
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, [*options, "--classes", "Concise,friendly"])
    assert result.exit_code == 0, result.output
    numbers = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(numbers["table"]) == {"concise", "friendly", "concise+friendly"}
    records = [json.loads(line) for line in (tmp_path / "out" / "results_responses.jsonl").read_text().splitlines()]
    unguided = [r for r in records[1:] if r["job"] == "-|unguided|0"]
    cut = [r["finish_reason"] == "length" for r in unguided]
    assert numbers["unguided"]["cut_off"] == pytest.approx(sum(cut) / len(cut))
    assert "| cut off | stopped short | unfinished |" in (tmp_path / "out" / "results.md").read_text()
    older = [{key: value for key, value in r.items() if key != "finish_reason"} for r in unguided]
    assert math.isnan(summarize(older)["cut_off"]) and math.isnan(summarize(older)["stopped_short"])


def test_answers_the_model_ends_within_a_few_words_count_as_stopped_short():
    from cliper_integrations.evaluation.metrics import word_count
    from cliper_integrations.evaluation.steering import SHORT_ANSWER_WORDS, summarize

    def record(response: str, finish_reason: str) -> dict:
        fields = {"fk_grade": 5.0, "vader": 0.0, "perplexity": 2.0, "refusal": False}
        return {"response": response, "words": word_count(response), "finish_reason": finish_reason, **fields}

    few = " ".join(["word"] * (SHORT_ANSWER_WORDS - 1))
    enough = " ".join(["word"] * SHORT_ANSWER_WORDS)
    # ended by the model after a few words: counted; as many words but out of tokens, or one more: not
    records = [record(few, "stop"), record("The", "stop"), record(few, "length"), record(enough, "stop")]
    assert summarize(records)["stopped_short"] == pytest.approx(0.5)


def test_answers_the_model_ends_mid_sentence_count_as_unfinished():
    """Ended by the model on a word, a digit or a comma: unfinished; on closing punctuation, a table's bar or
    code's brace, cut off by the token cap, or declining: not."""
    from cliper_integrations.evaluation.steering import summarize

    def record(response: str, finish_reason: str = "stop", refusal: bool = False) -> dict:
        fields = {"words": len(response.split()), "fk_grade": 5.0, "vader": 0.0, "perplexity": 2.0}
        return {"response": response, "finish_reason": finish_reason, "refusal": refusal, **fields}

    unfinished = [record("Subject"), record("To estimate the cost of supplies required \n"), record("about 3,")]
    finished = [
        record("It rains."),
        record("| a | b |"),
        record("```python\nprint(1)\n```"),
        record("Cut off by the cap at", "length"),
        record("I can't help with that", refusal=True),
    ]
    assert summarize(unfinished + finished)["unfinished"] == pytest.approx(3 / 8)
    older = [{key: value for key, value in r.items() if key != "finish_reason"} for r in unfinished]
    assert math.isnan(summarize(older)["unfinished"])


def test_a_hedge_that_goes_on_to_answer_is_not_counted_as_declining(base, monkeypatch):
    from cliper_integrations.core.engine import CLIPerEngine
    from cliper_integrations.evaluation.steering import declines, summarize

    engine = CLIPerEngine(base, classifier=None)
    hedge = "As an AI language model, I have no views, but here is how rain forms: " + "water vapour cools " * 8
    short = "As an AI language model, I cannot discuss politics."
    lookahead = sum(len(engine.tokenizer(text)["input_ids"]) for text in (hedge, short)) // 2  # between the two
    monkeypatch.setattr(engine, "disclaimer_lookahead", lookahead)
    assert declines(engine, "I'm sorry, but I can't assist with that.") and declines(engine, short)
    assert not declines(engine, hedge) and not declines(engine, "Rain falls from clouds.")
    monkeypatch.setattr(engine, "disclaimer_lookahead", None)  # an engine that drafts no further judges by opening
    assert declines(engine, hedge)

    monkeypatch.setattr(engine, "disclaimer_lookahead", lookahead)
    fields = {"words": 5, "fk_grade": 5.0, "vader": 0.0, "perplexity": 2.0, "finish_reason": "stop"}
    records = [{"response": text, "refusal": True, **fields} for text in (hedge, short)]
    assert summarize(records)["refusals"] == 1.0  # what each answer recorded: is_refusal
    assert summarize(records, lambda record: declines(engine, record["response"]))["refusals"] == 0.5


def test_rewriting_the_report_keeps_the_hand_written_notes(tmp_path):
    from cliper_integrations.evaluation.steering import NOTES_MARKER, write_report

    page = tmp_path / "results.md"
    write_report(page, "# Steering results\n\nold numbers")
    page.write_text(page.read_text() + "Concise missed its target because ...\n")
    write_report(page, "# Steering results\n\nnew numbers")
    text = page.read_text()
    assert "new numbers" in text and "old numbers" not in text
    assert text.index(NOTES_MARKER) < text.index("Concise missed its target because")


def test_target_verdicts_read_the_direction_of_each_class():
    from cliper_integrations.evaluation.steering import fluency, moves_further, verdict

    unguided = {"words": 100, "fk_grade": 8.0, "vader": 0.5, "distinct2": 0.8, "perplexity": 3.0}
    shorter_simpler_sadder = {"words": 50, "fk_grade": 5.0, "vader": 0.1, "distinct2": 0.7, "perplexity": 5.0}
    assert verdict("concise", unguided, shorter_simpler_sadder) == "0.50× ✔"
    assert verdict("informative", unguided, shorter_simpler_sadder) == "0.50× ✘"
    assert verdict("elementary", unguided, shorter_simpler_sadder) == "-3.00 ✔"
    assert verdict("expert", unguided, shorter_simpler_sadder) == "-3.00 ✘"
    assert verdict("unfriendly", unguided, shorter_simpler_sadder) == "-0.40 ✔"
    assert moves_further("concise", unguided, shorter_simpler_sadder).endswith("✔")
    assert moves_further("friendly", unguided, shorter_simpler_sadder).endswith("✘")
    # a difference too small to print is a tie, whichever its sign: it beats nothing
    for nudge in (0.001, -0.001):
        assert moves_further("unfriendly", unguided, {**unguided, "vader": 0.5 + nudge}) == "±0.00 ✘ (tie)"
    assert fluency(unguided, shorter_simpler_sadder) == "ppl 1.67× ✘, distinct-2 0.87× ✘"
    assert fluency(unguided, unguided) == "ppl 1.00× ✔, distinct-2 1.00× ✔"


def _answers(metric: str, values: list[float], first_id: int = 0) -> list[dict]:
    return [{"prompt_id": first_id + i, metric: value} for i, value in enumerate(values)]


def test_a_target_interval_pairs_each_answer_with_the_reference_answer_to_its_prompt():
    from cliper_integrations.evaluation.steering import paired_interval

    # prompts as different as a one-word fact and a long list: halving every answer is exactly 0.5× on any
    # draw of them, and one grade more is exactly +1, however much the prompts themselves differ
    lengths = [3.0, 180.0, 40.0, 7.0, 120.0, 65.0, 12.0, 150.0]
    unguided, halved = _answers("words", lengths), _answers("words", [n / 2 for n in lengths])
    assert paired_interval("words", halved, unguided, ratio=True) == pytest.approx((0.5, 0.5))
    grades = _answers("fk_grade", [g + 1 for g in lengths])
    assert paired_interval("fk_grade", grades, _answers("fk_grade", lengths), ratio=False) == pytest.approx((1, 1))


def test_a_target_interval_holds_its_figure_narrows_with_more_prompts_and_is_the_same_each_run():
    from cliper_integrations.evaluation.steering import paired_interval

    rng = np.random.default_rng(1)
    widths = []
    for count in (25, 400):
        base = rng.uniform(-1, 1, count)
        moved = np.clip(base - 0.2 + rng.normal(0, 0.3, count), -1, 1)
        unguided, guided = _answers("vader", list(base)), _answers("vader", list(moved))
        low, high = paired_interval("vader", guided, unguided, ratio=False)
        assert low < float(np.mean(moved) - np.mean(base)) < high
        assert (low, high) == paired_interval("vader", guided, unguided, ratio=False)  # seeded: a page rewrites alike
        widths.append(high - low)
    assert widths[1] < widths[0] / 2


def test_a_target_interval_refuses_answers_to_other_prompts_and_needs_two_prompts():
    from cliper_integrations.core.errors import EvalStoreError
    from cliper_integrations.evaluation.steering import paired_interval

    with pytest.raises(EvalStoreError, match="same prompts"):
        paired_interval("words", _answers("words", [1.0, 2.0]), _answers("words", [1.0, 2.0], first_id=5), True)
    one = paired_interval("words", _answers("words", [1.0]), _answers("words", [2.0]), ratio=True)
    assert all(math.isnan(end) for end in one)


def _eval_config(tmp_path, prompts, **options):
    from cliper_integrations.evaluation.steering import EvalConfig

    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"id": 10 + i, "prompt": p} for i, p in enumerate(prompts)]))
    options = {"max_new_tokens": 4, "batch_size": 2, "sweep": (0.0, 4.0), "combinations": [], **options}
    return EvalConfig(path, tmp_path / "out", **options)


def test_eval_resumes_from_stored_responses_and_refuses_another_runs(tmp_path, monkeypatch, base, shared_classifier):
    from cliper_integrations.core import logits_processor
    from cliper_integrations.core.engine import CLIPerEngine
    from cliper_integrations.core.errors import EvalStoreError
    from cliper_integrations.evaluation.steering import RESPONSES_FILE, plan, run_eval

    engine = CLIPerEngine(base, classifier=shared_classifier)
    prompts = ["Explain rain.", "Hi", "Paris?"]
    store = tmp_path / "out" / RESPONSES_FILE
    first = run_eval(engine, _eval_config(tmp_path, prompts, limit=1))
    after_one = store.read_text()
    jobs = len(plan(_eval_config(tmp_path, prompts)))
    assert len(after_one.splitlines()) == 1 + jobs  # header, then one response per job

    # Killed mid-write: the broken last line is dropped and answered again.
    store.write_text(after_one + '{"prompt_id": 11, "job": "-|ung')
    second = run_eval(engine, _eval_config(tmp_path, prompts, limit=3))
    text = store.read_text()
    assert text.startswith(after_one)  # the first prompt's responses were kept, not made again
    records = [json.loads(line) for line in text.splitlines()[1:]]
    assert len(records) == 3 * jobs
    assert len({(r["prompt_id"], r["job"]) for r in records}) == 3 * jobs
    assert {r["prompt_id"] for r in records} == {10, 11, 12}
    assert first["prompts"] == 1 and second["prompts"] == 3
    assert second["unguided"]["words"] == pytest.approx(
        sum(r["words"] for r in records if r["job"] == "-|unguided|0") / 3
    )

    rerun = run_eval(engine, _eval_config(tmp_path, prompts, limit=3))
    assert store.read_text() == text and rerun == second  # nothing left to answer: same numbers

    with pytest.raises(EvalStoreError, match="--restart"):
        run_eval(engine, _eval_config(tmp_path, prompts, limit=1, max_new_tokens=5))
    changes = ({"guided_no_repeat_ngram": None}, {"guided_plausibility": None}, {"refusal_lookahead": None})
    for changed in ({"model": "tiny-base", "dtype": "bfloat16"}, *changes):
        other = CLIPerEngine(**{"model": base, **changed}, classifier=shared_classifier)
        with pytest.raises(EvalStoreError, match="--restart"):  # guided answers would differ: not mixed in
            run_eval(other, _eval_config(tmp_path, prompts, limit=3))
    source = inspect.getsource(logits_processor)
    reworded = "# a comment\n" + source.replace('"""', '"""Reworded. ', 1).replace("\n\n", "\n\n\n", 1)
    with monkeypatch.context() as patched:  # the decoding rule's code changed: its answers would differ too
        patched.setattr(inspect, "getsource", lambda module: source + "\nRULE_VERSION = 2\n")
        with pytest.raises(EvalStoreError, match="--restart"):
            run_eval(engine, _eval_config(tmp_path, prompts, limit=3))
        patched.setattr(inspect, "getsource", lambda module: reworded)  # only its words and layout: kept
        assert run_eval(engine, _eval_config(tmp_path, prompts, limit=3)) == second
    assert store.read_text() == text  # refusing loses nothing
    run_eval(engine, _eval_config(tmp_path, prompts, limit=1, max_new_tokens=5, restart=True))
    assert len(store.read_text().splitlines()) == 1 + jobs


def test_a_new_classifier_takes_another_runs_unguided_answers_and_makes_only_its_guided_ones(
    tmp_path, monkeypatch, base, shared_classifier
):
    from cliper_integrations.core.engine import CLIPerEngine
    from cliper_integrations.core.errors import EvalStoreError
    from cliper_integrations.evaluation import steering
    from tests.tiny import tiny_classifier

    prompts = ["Explain rain.", "Hi"]
    first_run, longer_run = tmp_path / "first", tmp_path / "longer"
    first_run.mkdir(), longer_run.mkdir()
    steering.run_eval(CLIPerEngine(base, classifier=shared_classifier), _eval_config(first_run, prompts))
    theirs = _stored(first_run / "out")
    other = CLIPerEngine(base, classifier=tiny_classifier(base, "shared", seed=5))
    assert other.classifier.guidance_digest() != shared_classifier.guidance_digest()

    answered = _answered_jobs(monkeypatch)
    config = _eval_config(tmp_path, prompts, reuse_from=(first_run / "out",))
    results = steering.run_eval(other, config)
    # nothing made without guidance was answered again
    assert {job.setting for job in answered} == {"guidance", "prompt+guidance"}
    ours = _stored(tmp_path / "out")
    unguided_jobs = {job.key for job in steering.plan(config) if not steering.SETTINGS[job.setting]["guided"]}
    assert {k: v for k, v in ours.items() if k[1] in unguided_jobs} == {
        k: v for k, v in theirs.items() if k[1] in unguided_jobs
    }
    assert len(ours) == len(theirs)  # every job of this run answered for every prompt
    assert results["unguided"] == steering.summarize([theirs[(pid, "-|unguided|0")] for pid in (10, 11)])

    before = (tmp_path / "out" / steering.RESPONSES_FILE).read_text()
    longer = _eval_config(longer_run, prompts, max_new_tokens=5, reuse_from=(first_run / "out",))
    with pytest.raises(EvalStoreError, match="max_new_tokens"):  # answers of another token budget differ
        steering.run_eval(other, longer)
    with pytest.raises(EvalStoreError, match="no stored responses"):
        steering.run_eval(other, _eval_config(tmp_path, prompts, reuse_from=(tmp_path / "nowhere",)))
    assert (tmp_path / "out" / steering.RESPONSES_FILE).read_text() == before  # refusing loses nothing


def test_a_store_from_before_the_unrequested_opening_lends_all_but_its_prompted_guided_refusals(
    tmp_path, monkeypatch, base, shared_classifier
):
    """Since the engine answers a prompted, guided row that declines only when asked from the plain
    question's opening, only such answers can differ: a store made before lends every other answer, and
    its prompted, guided answers that open with a refusal are answered again."""
    from cliper_integrations.core.engine import CLIPerEngine
    from cliper_integrations.core.preferences import is_refusal
    from cliper_integrations.evaluation.steering import RESPONSES_FILE, run_eval

    engine, prompts = CLIPerEngine(base, classifier=shared_classifier), ["Explain rain.", "Hi"]
    before = tmp_path / "old"
    before.mkdir()
    run_eval(engine, _eval_config(before, prompts))
    path = before / "out" / RESPONSES_FILE
    header, *lines = path.read_text().splitlines()
    run = {key: value for key, value in json.loads(header)["run"].items() if key != "unrequested_opening"}
    records = [json.loads(line) for line in lines]
    asked = [r for r in records if r["job"].split("|")[1] == "prompt+guidance"]
    alone = next(r for r in records if r["job"].split("|")[1] == "guidance")
    for record, text in ((asked[0], "I'm sorry, I can't."), (alone, "I'm sorry, I can't."), (asked[1], "lent as is")):
        record.update(response=text, refusal=is_refusal(text))
    path.write_text("".join(json.dumps(line) + "\n" for line in [{"run": run}, *records]))

    answered = _answered_jobs(monkeypatch)
    run_eval(engine, _eval_config(tmp_path, prompts, reuse_from=(before / "out",)))
    ours = _stored(tmp_path / "out")
    assert ours[(asked[0]["prompt_id"], asked[0]["job"])]["response"] != asked[0]["response"]
    assert [job.key for job in answered] == [asked[0]["job"]]  # the only answer made again
    assert ours[(alone["prompt_id"], alone["job"])]["response"] == alone["response"]
    assert ours[(asked[1]["prompt_id"], asked[1]["job"])]["response"] == "lent as is"


def test_a_store_from_before_the_disclaimer_lookahead_answers_again_only_guided_rows_of_hedged_prompts(
    tmp_path, monkeypatch, base, shared_classifier
):
    """Since the engine guides a row whose base model hedges ("As an AI …") and then answers, only guided
    answers to prompts the base model opens with a disclaimer can differ: a store made before lends every
    answer to the other prompts, and its unguided answers everywhere."""
    from cliper_integrations.core.engine import CLIPerEngine
    from cliper_integrations.core.preferences import is_refusal
    from cliper_integrations.evaluation import steering

    engine, prompts = CLIPerEngine(base, classifier=shared_classifier), ["Explain rain.", "Hi"]
    before = tmp_path / "old"
    before.mkdir()
    steering.run_eval(engine, _eval_config(before, prompts))
    path = before / "out" / steering.RESPONSES_FILE
    header, *lines = path.read_text().splitlines()
    run = {k: v for k, v in json.loads(header)["run"].items() if k not in steering.DISCLAIMER_SIGNATURE}
    records = [json.loads(line) for line in lines]
    hedged = "As an AI language model, I have no opinions."
    unguided = next(r for r in records if r["prompt_id"] == 10 and r["job"] == "-|unguided|0")
    kept = next(r for r in records if r["prompt_id"] == 11 and r["guidance"])
    unguided.update(response=hedged, refusal=is_refusal(hedged))
    kept.update(response="lent as is")
    path.write_text("".join(json.dumps(line) + "\n" for line in [{"run": run}, *records]))

    asked: list[tuple[str, str]] = []
    generate_rows = steering.generate_rows

    def counted(engine, rows, config):
        asked.extend((job.key, prompt) for job, prompt in rows)
        return generate_rows(engine, rows, config)

    monkeypatch.setattr(steering, "generate_rows", counted)
    steering.run_eval(engine, _eval_config(tmp_path, prompts, reuse_from=(before / "out",)))
    ours = _stored(tmp_path / "out")
    guided_there = {r["job"] for r in records if r["prompt_id"] == 10 and r["guidance"]}
    assert guided_there and {job for job, _ in asked} == guided_there
    assert all(prompt == prompts[0] for _, prompt in asked)  # the hedged prompt only
    assert ours[(10, "-|unguided|0")]["response"] == hedged and ours[(11, kept["job"])]["response"] == "lent as is"


def test_a_classifier_with_a_new_part_takes_the_guided_answers_of_the_classes_it_guides_alike(
    tmp_path, monkeypatch, base
):
    """``reuse_from`` with a ``main-joint`` composition: the main head's classes guide exactly as before, so
    their guided answers are taken; only the part's classes are answered again, and the taken answers are
    what this classifier gives when it answers everything itself."""
    from cliper_integrations.core.classifier import compose
    from cliper_integrations.core.engine import CLIPerEngine
    from cliper_integrations.evaluation import steering
    from tests.tiny import tiny_classifier

    main, donor = (tiny_classifier(base, "shared", seed=seed, form="bayes") for seed in (1, 7))
    hybrid = compose(main, [(["friendly", "unfriendly"], donor)], posterior="main-joint")
    prompts, options = ["Explain rain.", "Hi"], {"classes": ("concise", "friendly"), "sweep": (0.0,)}
    first, scratch, chained = tmp_path / "first", tmp_path / "scratch", tmp_path / "chained"
    first.mkdir(), scratch.mkdir(), chained.mkdir()
    steering.run_eval(CLIPerEngine(base, classifier=main), _eval_config(first, prompts, **options))
    steering.run_eval(CLIPerEngine(base, classifier=hybrid), _eval_config(scratch, prompts, **options))

    answered = _answered_jobs(monkeypatch)
    steering.run_eval(
        CLIPerEngine(base, classifier=hybrid), _eval_config(tmp_path, prompts, reuse_from=(first / "out",), **options)
    )
    # concise's guided answers and every unguided one were taken
    assert {job.classes for job in answered} == {("friendly",)}
    ours, theirs, own = (_stored(folder / "out") for folder in (tmp_path, first, scratch))
    assert ours == own  # the same table as answering everything with this classifier
    assert {k: v for k, v in ours.items() if "concise|" in k[1]} == {
        k: v for k, v in theirs.items() if "concise|" in k[1]
    }

    # Each answer records what guided it, so the answers this run took can be taken from its store again.
    answered.clear()
    steering.run_eval(
        CLIPerEngine(base, classifier=hybrid), _eval_config(chained, prompts, reuse_from=(tmp_path / "out",), **options)
    )
    assert answered == [] and _stored(chained / "out") == own

    # Two folders, each holding part of the answers: concise's from the main head's run, friendly's from
    # a run that measured friendly only; together they leave nothing to answer.
    partial, merged = tmp_path / "partial", tmp_path / "merged"
    partial.mkdir(), merged.mkdir()
    friendly_only = {**options, "classes": ("friendly",)}
    steering.run_eval(CLIPerEngine(base, classifier=hybrid), _eval_config(partial, prompts, **friendly_only))
    answered.clear()
    steering.run_eval(
        CLIPerEngine(base, classifier=hybrid),
        _eval_config(merged, prompts, reuse_from=(first / "out", partial / "out"), **options),
    )
    assert answered == [] and _stored(merged / "out") == own


@pytest.mark.parametrize(
    ("floors", "friendly_floors", "named"),
    [
        ({"plausibility_floors": {"friendly": 0.9}}, {"guidance": 0.9, "prompt+guidance": 0.9}, "friendly 0.9"),
        ({"unprompted_plausibility_floors": {"friendly": 0.9}}, {"guidance": 0.9}, "friendly 0.9 with guidance"),
        (
            {"plausibility_floors": {"friendly": 0.5}, "prompted_plausibility_floors": {"friendly": 0.9}},
            {"guidance": 0.5, "prompt+guidance": 0.9},
            "friendly 0.5 with guidance, friendly 0.9 with prompt+guidance",
        ),
    ],
)
def test_reuse_takes_the_answers_a_class_floor_leaves_alike_and_the_report_names_the_floor(
    tmp_path, monkeypatch, base, shared_classifier, floors, friendly_floors, named
):
    """A classifier that differs only by a stricter floor for friendly (in both settings, or in one) guides
    concise exactly as before, and friendly in a setting the floor leaves alone: those answers are taken,
    friendly's guided ones under the floor answered again."""
    from cliper_integrations.core.classifier import ClassifierConfig, PreferenceClassifier
    from cliper_integrations.core.engine import CLIPerEngine
    from cliper_integrations.evaluation import steering

    config = ClassifierConfig.model_validate({**shared_classifier.config.model_dump(), **floors})
    floored = PreferenceClassifier(config, base.model, shared_classifier.head)
    prompts, options = ["Explain rain.", "Hi"], {"classes": ("concise", "friendly"), "sweep": (0.0,)}
    first, scratch = tmp_path / "first", tmp_path / "scratch"
    first.mkdir(), scratch.mkdir()
    steering.run_eval(CLIPerEngine(base, classifier=shared_classifier), _eval_config(first, prompts, **options))
    steering.run_eval(CLIPerEngine(base, classifier=floored), _eval_config(scratch, prompts, **options))
    answered = _answered_jobs(monkeypatch)
    results = steering.run_eval(
        CLIPerEngine(base, classifier=floored), _eval_config(tmp_path, prompts, reuse_from=(first / "out",), **options)
    )
    assert {(job.classes, job.setting) for job in answered} == {(("friendly",), s) for s in friendly_floors}
    assert _stored(tmp_path / "out") == _stored(scratch / "out")  # as if this classifier answered everything
    by_setting = {
        s: {"friendly": friendly_floors[s]} if s in friendly_floors else {} for s in ("guidance", "prompt+guidance")
    }
    assert results["plausibility"] == {"engine": 0.1, "classes": by_setting}
    report = (tmp_path / "out" / "results.md").read_text()
    assert f"guided rows under a plausibility floor 0.1 ({named}: the classifier's own), a loop guard" in report


def test_reuse_takes_what_a_class_sparing_the_favourite_leaves_alike_combinations_included(
    tmp_path, monkeypatch, base, shared_classifier
):
    """A classifier whose loop guard spares the favourite for friendly guides concise, and concise with
    friendly (the stricter guard wins), exactly as before: only friendly's own guided rows are answered
    again, the sweep included, and guidance alone runs at friendly's scaled α on every prompt."""
    from cliper_integrations.core.classifier import ClassifierConfig, PreferenceClassifier
    from cliper_integrations.core.engine import CLIPerEngine
    from cliper_integrations.evaluation import steering

    settings = {"unprompted_favourite_ngrams": {"friendly": None}, "prompted_favourite_ngrams": {"friendly": 8}}
    config = ClassifierConfig.model_validate({**shared_classifier.config.model_dump(), **settings})
    sparing = PreferenceClassifier(config, base.model, shared_classifier.head)
    prompts = ["Explain rain.", "Hi"]
    options = {"classes": ("concise", "friendly"), "combinations": [("concise", "friendly")], "sweep": (0.0, 8.0)}
    first = tmp_path / "first"
    first.mkdir()
    steering.run_eval(CLIPerEngine(base, classifier=shared_classifier), _eval_config(first, prompts, **options))
    answered = _answered_jobs(monkeypatch)
    config = _eval_config(tmp_path, prompts, reuse_from=(first / "out",), guided_alpha={"friendly": 16.0}, **options)
    results = steering.run_eval(CLIPerEngine(base, classifier=sparing), config)
    assert {(job.classes, job.setting, job.alpha) for job in answered} == {
        (("friendly",), "guidance", 16.0),
        (("friendly",), "prompt+guidance", 8.0),
        (("friendly",), "guidance", 8.0),  # the sweep's α = 8: friendly's guidance alone is now 16
    }
    rules = {"guidance": {"friendly": None}, "prompt+guidance": {"friendly": 8}}
    assert results["loop_guard"] == {"no_repeat_ngram": 4, "favourite_ngrams": rules}
    assert results["guided_alpha"] == {"concise": 8.0, "friendly": 16.0}
    assert set(results["sweep"]["friendly"]) == {"0.0", "8.0", "16.0"}
    report = (tmp_path / "out" / "results.md").read_text()
    assert "(guidance alone: friendly α = 16)" in report
    assert (
        "a loop guard against repeated 4-grams (the base model's favourite token, by the classifier's own rule: "
        "friendly guidance: spared; friendly prompt+guidance: banned only from repeating 8-grams)" in report
    )


def test_answers_asked_for_in_other_words_are_answered_again_and_never_taken(
    tmp_path, monkeypatch, base, shared_classifier
):
    """Rewording one class's request strands exactly the answers whose prompts carried it (that class's
    prompted rows and the combinations asking for it), in the run's own store and in one it reuses; an
    answer from before answers recorded their request counts as made in other words."""
    from cliper_integrations.core import preferences
    from cliper_integrations.core.engine import CLIPerEngine
    from cliper_integrations.evaluation import steering

    engine = CLIPerEngine(base, classifier=shared_classifier)
    prompts = ["Explain rain.", "Hi"]
    options = {"classes": ("concise", "friendly"), "combinations": [("concise", "friendly")], "sweep": ()}
    first = tmp_path / "first"
    first.mkdir()
    steering.run_eval(engine, _eval_config(first, prompts, **options))
    stored = _stored(first / "out")
    prompted = {key for _, key in stored if steering.SETTINGS[key.split("|")[1]]["prompted"]}
    assert prompted == {"concise|prompt|8", "concise|prompt+guidance|8", "friendly|prompt|8"} | {
        "friendly|prompt+guidance|8",
        "concise+friendly|prompt+guidance|8",
    }
    assert all((record["request"] is None) == (key not in prompted) for (_, key), record in stored.items())
    assert stored[(10, "concise|prompt|8")]["request"] != stored[(10, "friendly|prompt|8")]["request"]

    answered = _answered_jobs(monkeypatch)
    reworded = {**preferences.PREFERENCE_REQUESTS, "friendly": "Be kind and cheerful."}
    monkeypatch.setattr(preferences, "PREFERENCE_REQUESTS", reworded)
    friendly_prompted = {"friendly|prompt|8", "friendly|prompt+guidance|8", "concise+friendly|prompt+guidance|8"}
    for config in (  # another run taking the first's answers, then the first resuming in its own store
        _eval_config(tmp_path, prompts, reuse_from=(first / "out",), **options),
        _eval_config(first, prompts, **options),
    ):
        steering.run_eval(engine, config)
        assert {job.key for job in answered} == friendly_prompted and len(answered) == len(
            friendly_prompted
        )  # one batch each
        answered.clear()
    ours = _stored(tmp_path / "out")
    assert ours[(10, "friendly|prompt|8")]["request"] != stored[(10, "friendly|prompt|8")]["request"]
    assert {k: v for k, v in ours.items() if k[1] not in friendly_prompted} == {
        k: v for k, v in stored.items() if k[1] not in friendly_prompted
    }

    legacy = tmp_path / "legacy"
    (legacy / "out").mkdir(parents=True)
    header, *lines = (tmp_path / "out" / steering.RESPONSES_FILE).read_text().splitlines()
    unrecorded = [{k: v for k, v in json.loads(line).items() if k != "request"} for line in lines]
    (legacy / "out" / steering.RESPONSES_FILE).write_text("\n".join([header, *map(json.dumps, unrecorded)]) + "\n")
    steering.run_eval(engine, _eval_config(legacy, prompts, **options))
    # what was made without a request stands
    assert {job.key for job in answered} == prompted and len(answered) == len(prompted)


def test_a_job_is_read_back_from_its_key():
    from cliper_integrations.evaluation.steering import Job

    for job in (Job((), "unguided", 0.0), Job(("concise",), "guidance", 16.0), Job(("a", "b"), "prompt", (4.0, 2.0))):
        assert Job.from_key(job.key) == job


def _answered_jobs(monkeypatch) -> list:
    """Have ``cliper eval`` record, for every batch it answers (rather than takes from a store), each job
    with rows in it."""
    from cliper_integrations.evaluation import steering

    answered = []
    generate_rows = steering.generate_rows

    def counted(engine, rows, config):
        answered.extend(dict.fromkeys(job for job, _ in rows))
        return generate_rows(engine, rows, config)

    monkeypatch.setattr(steering, "generate_rows", counted)
    return answered


def _stored(output) -> dict[tuple[int, str], dict]:
    from cliper_integrations.evaluation.steering import RESPONSES_FILE

    lines = (output / RESPONSES_FILE).read_text().splitlines()[1:]
    return {(r["prompt_id"], r["job"]): r for r in map(json.loads, lines)}


def test_a_quick_check_shares_batches_across_settings_and_a_full_chunk_decodes_job_by_job(
    tmp_path, monkeypatch, base, shared_classifier
):
    from cliper_integrations.core.engine import CLIPerEngine
    from cliper_integrations.evaluation import steering

    engine = CLIPerEngine(base, classifier=shared_classifier)
    sizes = []
    generate_batch = engine.generate_batch

    def counted(requests):
        sizes.append(len(requests))
        return generate_batch(requests)

    monkeypatch.setattr(engine, "generate_batch", counted)
    prompts, options = ["Explain rain.", "Paris?"], {"classes": ("concise", "friendly")}  # 9 jobs: unguided,
    (tmp_path / "quick").mkdir()  # 3 settings per class and one α of the sweep per class
    quick_config = _eval_config(tmp_path / "quick", prompts, batch_size=4, **options)
    steering.run_eval(engine, quick_config)
    assert sizes == [4, 4, 4, 4, 2]  # 18 answers in 5 calls, where one call per job made 9 of 2
    quick = _stored(tmp_path / "quick" / "out")
    for (prompt_id, key), record in quick.items():  # each row answered for its own job, as alone
        job = steering.Job.from_key(key)
        assert record["response"] == steering.generate(engine, [prompts[prompt_id - 10]], job, quick_config)[0].text
        assert record["request"] == job.request

    answered = _answered_jobs(monkeypatch)
    (tmp_path / "full").mkdir()
    steering.run_eval(engine, _eval_config(tmp_path / "full", prompts, **options))
    assert len(answered) == len(set(answered)) == 9  # batches of 2 prompts: one call per job, as before
    assert _stored(tmp_path / "full" / "out") == quick


def test_a_sweep_limit_answers_the_other_alphas_on_the_first_prompts_and_plots_every_alpha_there(
    tmp_path, base, shared_classifier
):
    from cliper_integrations.core.engine import CLIPerEngine
    from cliper_integrations.evaluation.steering import RESPONSES_FILE, run_eval, summarize

    engine = CLIPerEngine(base, classifier=shared_classifier)
    results = run_eval(engine, _eval_config(tmp_path, ["Explain rain.", "Hi", "Paris?"], sweep_limit=1))
    records = [json.loads(line) for line in (tmp_path / "out" / RESPONSES_FILE).read_text().splitlines()[1:]]
    swept = {r["prompt_id"] for r in records if r["job"] == "concise|guidance|4"}
    assert swept == {10} and {r["prompt_id"] for r in records if r["job"] == "concise|guidance|8"} == {10, 11, 12}
    assert results["prompts"] == 3 and results["sweep_prompts"] == 1
    first = [r for r in records if r["prompt_id"] == 10]
    for alpha, job in (("0.0", "-|unguided|0"), ("4.0", "concise|guidance|4"), ("8.0", "concise|guidance|8")):
        assert results["sweep"]["concise"][alpha] == summarize([r for r in first if r["job"] == job])
    guided = [r for r in records if r["job"] == "concise|guidance|8"]
    assert results["table"]["concise"]["guidance"] == summarize(guided)
    assert "on the first 1 prompts" in (tmp_path / "out" / "results.md").read_text()


def test_prompting_plus_guidance_guides_at_its_own_alpha_per_class_and_the_report_says_so(
    tmp_path, base, shared_classifier
):
    from cliper_integrations.core.engine import CLIPerEngine
    from cliper_integrations.evaluation.steering import RESPONSES_FILE, run_eval, summarize

    engine = CLIPerEngine(base, classifier=shared_classifier)
    asked: set[tuple[bool, bool, tuple]] = set()
    real = engine.generate_batch

    def recording(requests):
        asked.update((r.guidance, r.preference_prompt, tuple(sorted(r.weights.items()))) for r in requests)
        return real(requests)

    engine.generate_batch = recording
    config = _eval_config(
        tmp_path,
        ["Explain rain.", "Hi"],
        classes=("concise", "friendly"),
        combinations=[("concise", "friendly")],
        sweep=(),
        prompted_alpha={"concise": 2.0},
    )
    results = run_eval(engine, config)
    assert {
        (True, True, (("concise", 2.0),)),  # prompting plus guidance at its own α
        (True, False, (("concise", 8.0),)),  # guidance alone at --alpha
        (True, True, (("friendly", 8.0),)),  # a class not named: --alpha
        (True, True, (("concise", 2.0), ("friendly", 8.0))),  # a combination: each class its own α
    } <= asked
    assert (True, True, (("concise", 8.0),)) not in asked
    records = [json.loads(line) for line in (tmp_path / "out" / RESPONSES_FILE).read_text().splitlines()[1:]]
    jobs = {r["job"] for r in records}
    assert {"concise|prompt|8", "concise|guidance|8", "concise|prompt+guidance|2"} <= jobs
    assert {"friendly|prompt+guidance|8", "concise+friendly|prompt+guidance|2,8"} <= jobs
    combined = [r for r in records if r["job"] == "concise|prompt+guidance|2"]
    assert results["table"]["concise"]["prompt+guidance"] == summarize(combined)
    assert results["prompted_alpha"] == {"concise": 2.0, "friendly": 8.0}
    report = (tmp_path / "out" / "results.md").read_text()
    assert (
        "α = 8.0 per requested class (prompting plus guidance: concise α = 2), "
        "guided rows under a plausibility floor 0.1, a loop guard against repeated 4-grams." in report
    )


def test_bench_leaves_the_engine_it_measures_as_it_was(base):
    """The bench measures with and without the look-ahead and with a stand-in head; an engine that also
    serves live requests must come out with its own settings."""
    from cliper_integrations.core.engine import CLIPerEngine
    from cliper_integrations.evaluation.bench import run_bench

    engine = CLIPerEngine(base, classifier=None, refusal_lookahead=3)
    figures = run_bench(engine, max_new_tokens=2, repeats=1)
    assert engine.classifier is None and engine.refusal_lookahead == 3
    assert figures.refusal_lookahead == 3
    assert figures.classifier == "shared, untrained head of the default architecture"


def test_bench_times_a_disclaimer_stream_and_says_whether_the_engine_guided_it(base, classifier):
    """The bench's disclaimer figures are only about a disclaimer where the engine took the prompt's opening
    for one (on another model the prompt may open otherwise): ``disclaimer_guided`` must say which it was."""
    from cliper_integrations.core.engine import CLIPerEngine
    from cliper_integrations.evaluation.bench import run_bench

    options = {"classifier": classifier, "declines": lambda text: True, "disclaimer_lookahead": 4}
    hedging = run_bench(CLIPerEngine(base, **options, disclaims=lambda text: True), max_new_tokens=2, repeats=1)
    assert hedging.disclaimer_guided and hedging.disclaimer_lookahead == 4
    assert hedging.disclaimer_guided_first_text_s > 0 and hedging.disclaimer_unguided_first_text_s > 0
    refusing = run_bench(CLIPerEngine(base, **options, disclaims=lambda text: False), max_new_tokens=2, repeats=1)
    assert not refusing.disclaimer_guided


def test_one_table_does_not_decide_a_settings_grade():
    """A table reads to Flesch-Kincaid as one long sentence (grade 30 to 50): the grade of a setting is
    the median over its answers, so one such answer cannot flip a class's verdict."""
    from cliper_integrations.evaluation.metrics import fk_grade
    from cliper_integrations.evaluation.steering import summarize

    prose = ["The cat sat on the mat.", "Dogs like to run and play in the park.", "We went home after lunch."]
    table = "| name | price | renewal date | notes |\n" + "| Netflix | 10 | monthly | shared with family |\n" * 12
    assert fk_grade(table) > 20
    records = [
        {
            "response": text,
            "words": len(text.split()),
            "fk_grade": fk_grade(text),
            "vader": 0.0,
            "perplexity": 2.0,
            "refusal": False,
        }
        for text in [*prose, table]
    ]
    assert summarize(records)["fk_grade"] < 5
