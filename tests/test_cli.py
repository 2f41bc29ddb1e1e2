"""The `cliper` command on a tiny model saved to a folder (so the folder model spec is exercised too)."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
from typer.testing import CliRunner

from cliper_integrations.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, base):
    folder = tmp_path_factory.mktemp("tiny-cli-model")
    base.model.save_pretrained(folder)
    base.tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory, shared_classifier):
    return str(shared_classifier.save(tmp_path_factory.mktemp("tiny-cli-classifier")))


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_generate_json_for_several_weight_sets(model_folder, classifier_folder):
    result = run(
        "generate",
        "--model",
        model_folder,
        "--classifier",
        classifier_folder,
        "--prompt",
        "Hi",
        "--weights",
        "concise=3",
        "--weights",
        "P1B=2,friendly=1",
        "--max-new-tokens",
        6,
        "--json",
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["weights"] for r in records] == [{"concise": 3.0}, {"expert": 2.0, "friendly": 1.0}]
    fields = {"prompt", "response", "new_tokens", "seconds", "weights", "weights_source", "warnings"}
    assert all(set(r) == fields and r["warnings"] == [] for r in records)
    assert {r["weights_source"] for r in records} == {"explicit"}
    assert all(0 < r["new_tokens"] <= 6 for r in records)


def test_generate_tells_what_the_engine_changed_about_an_answer(model_folder, classifier_folder):
    """A warning of the engine (here: a prompt too long for the context window, cut from the left) reaches
    the user: in the JSON record, and on stderr beside a plain answer."""
    common = ("generate", "--model", model_folder, "--classifier", classifier_folder, "--max-new-tokens", 4)
    long_prompt = "Tell me about rivers. " * 200
    record = json.loads(run(*common, "--prompt", long_prompt, "--json").stdout)
    assert len(record["warnings"]) == 1 and record["warnings"][0].startswith("Prompt truncated from the left")
    plain = run(*common, "--prompt", long_prompt)
    assert plain.exit_code == 0 and f"Warning: {record['warnings'][0]}" in plain.stderr


def test_generate_from_jsonl_input_and_row_errors(tmp_path, model_folder, classifier_folder):
    lines = [{"prompt": "Hi"}, {"instruction": "Summarise", "input": "Foxes jump."}, {"instruction": ""}]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines[:2]) + "\n")
    result = run(
        "generate",
        "--model",
        model_folder,
        "--classifier",
        classifier_folder,
        "--input",
        path,
        "--max-new-tokens",
        4,
        "--json",
        "--no-guidance",
        "--weights",
        "concise=1",
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in records] == ["Hi", "Summarise\n\nFoxes jump."]
    assert all(r["weights"] == {} for r in records)
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    partly_bad = run("generate", "--model", model_folder, "--input", path, "--json", "--max-new-tokens", 3)
    assert partly_bad.exit_code == 1
    records = [json.loads(line) for line in partly_bad.stdout.splitlines()]
    assert [("error" in r) for r in records] == [False, False, True]
    assert "EmptyPromptError" in records[2]["error"] and records[0]["response"]


@pytest.mark.parametrize(
    ("weights", "error"),
    [("loud=1", "UnknownClassError"), ("concise=-2", "InvalidWeightError"), ("concise", "InvalidWeightError")],
)
def test_bad_weights_exit_with_a_clear_error(model_folder, classifier_folder, weights, error):
    result = run(
        "generate", "--model", model_folder, "--classifier", classifier_folder, "--prompt", "Hi", "--weights", weights
    )
    assert result.exit_code == 2 and error in result.output


@pytest.mark.parametrize("option", ["--prompted-alpha", "--guided-alpha"])
@pytest.mark.parametrize(
    ("alphas", "error"),
    [("loud=1", "UnknownClassError"), ("concise=-2", "InvalidWeightError"), ("expert=4", "InvalidRequestError")],
)
def test_eval_refuses_bad_per_class_alphas_before_answering_anything(tmp_path, model_folder, option, alphas, error):
    out = tmp_path / "out"
    result = run(
        "eval",
        "--model",
        model_folder,
        "--output",
        str(out),
        option,
        alphas,
        "--limit",
        "1",
        "--classes",
        "concise,friendly",
    )
    assert result.exit_code == 2 and error in result.output
    assert not out.exists()


def test_eval_guides_at_memorys_scaled_alphas_unless_told(tmp_path, model_folder, classifier_folder):
    """By default each setting's α is memory's weight scaled by the classifier's factors for it; a class
    whose guidance alone runs at another α than ``--alpha`` still has that row answered on every prompt,
    while the sweep's other α values are answered on ``--sweep-limit`` prompts only."""
    scaled = shutil.copytree(classifier_folder, tmp_path / "scaled-classifier")
    config = json.loads((scaled / "classifier.json").read_text())
    factors = {"prompted_weight_factors": {"concise": 0.25}, "unprompted_weight_factors": {"friendly": 2.0}}
    (scaled / "classifier.json").write_text(json.dumps({**config, **factors}))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"id": 0, "prompt": "Hi"}, {"id": 1, "prompt": "Why is the sky blue?"}]))
    common = ("eval", "--model", model_folder, "--classifier", scaled, "--prompts", prompts, "--limit", 2)
    common += ("--no-sweep", "--classes", "concise,friendly", "--max-new-tokens", 4)

    def alphas(*extra):
        out = tmp_path / f"out{len(extra)}"
        result = run(*common, "--output", out, *extra)
        assert result.exit_code == 0, result.output
        results = json.loads((out / "results.json").read_text())
        return results["guided_alpha"], results["prompted_alpha"]

    assert alphas() == ({"concise": 8.0, "friendly": 16.0}, {"concise": 2.0, "friendly": 8.0})  # 8 × the factors
    told = ("--prompted-alpha", "concise=8", "--guided-alpha", "friendly=4")
    assert alphas(*told) == ({"concise": 8.0, "friendly": 4.0}, {"concise": 8.0, "friendly": 8.0})

    out = tmp_path / "swept"
    swept = ("--sweep", "--sweep-limit", "1", "--output", out)
    assert run(*common, *swept).exit_code == 0
    stored = (out / "results_responses.jsonl").read_text().splitlines()[1:]
    answered = Counter(json.loads(line)["job"] for line in stored)
    assert answered["friendly|guidance|16"] == 2 and answered["concise|guidance|8"] == 2  # the table's rows
    assert answered["friendly|guidance|8"] == 1 and answered["concise|guidance|16"] == 1  # the sweep's

    # --reuse-from repeats: every folder named is read, so a missing second one is refused.
    reused = ("--output", tmp_path / "reused", "--reuse-from", tmp_path / "out0", "--reuse-from", tmp_path / "nowhere")
    result = run(*common, *reused)
    assert result.exit_code == 2 and "EvalStoreError" in result.output and "nowhere" in result.output


def test_train_prior_on_default_needs_a_packaged_classifier(tmp_path, model_folder):
    """``--prior-on default`` names the packaged classifier of the model; a model without one is told so
    before any data is read or anything is written."""
    out = tmp_path / "out"
    result = run(
        "train", "--model", model_folder, "--prior-on", "default", "--data", tmp_path / "none.jsonl", "--output", out
    )
    assert result.exit_code == 2 and "ModelResolutionError" in result.output and "ships" in result.output
    assert not out.exists()


def test_train_part_takes_classes_and_a_folder(tmp_path, model_folder, classifier_folder):
    out = tmp_path / "out"
    common = ("train", "--model", model_folder, "--prior-on", classifier_folder, "--output", out)
    result = run(*common, "--part", "friendly")
    assert result.exit_code == 2 and "CLASSES=FOLDER" in result.output
    assert not out.exists()


def test_train_pole_limit_takes_a_class_and_a_number(tmp_path, model_folder):
    out = tmp_path / "out"
    common = ("train", "--model", model_folder, "--data", tmp_path / "none.jsonl", "--output", out)
    for spec in ("unfriendly", "unfriendly=curt", "=0"):
        result = run(*common, "--pole-limit", spec)
        assert result.exit_code == 2 and "CLASS=NUMBER" in result.output, spec
    result = run(*common, "--pole-limit", "unfriendly=0", "--no-contrast-filter")
    assert result.exit_code == 2 and "contrast filter" in result.output
    assert not out.exists()


def test_guidance_without_classifier(model_folder):
    result = run(
        "generate",
        "--model",
        model_folder,
        "--classifier",
        "none",
        "--prompt",
        "Hi",
        "--weights",
        "concise=1",
        "--max-new-tokens",
        3,
    )
    assert result.exit_code == 1 and "NoClassifierError" in result.output and "cliper train" in result.output


def test_info_and_bench(model_folder, classifier_folder):
    info = run("info", "--model", model_folder, "--classifier", classifier_folder)
    assert info.exit_code == 0, info.output
    assert "shared backbone" in info.stdout and "cache folder" in info.stdout
    bench = run(
        "bench",
        "--model",
        model_folder,
        "--classifier",
        classifier_folder,
        "--max-new-tokens",
        4,
        "--repeats",
        1,
        "--json",
    )
    assert bench.exit_code == 0, bench.output
    figures = json.loads(bench.stdout.splitlines()[-1])
    assert {"unguided_tok_s", "guided_tok_s", "ratio", "batch8_speedup", "peak_rss_mb"} <= set(figures)
    assert figures["ratio"] == pytest.approx(figures["guided_tok_s"] / figures["unguided_tok_s"], rel=0.01)
    assert figures["refusal_lookahead"] == 6
    without = figures["guided_without_lookahead_tok_s"]
    assert figures["lookahead_ratio"] == pytest.approx(figures["guided_tok_s"] / without, rel=0.01)
    assert figures["unguided_first_text_s"] > 0 and figures["guided_first_text_s"] > 0
    assert figures["threads4_tok_s"] > 0


def test_memory_commands_round_trip(tmp_path, model_folder, classifier_folder):
    db = f"sqlite:///{tmp_path / 'memory.sqlite3'}"
    assert run("memory", "set", "ann", "concise=0.5", "--db", db).exit_code == 0
    learned = run("memory", "learn", "ann", "I'm a cardiologist, skip the basics.", "--db", db)
    assert json.loads(learned.stdout)["changed"] == {"expert": 0.75}
    shown = json.loads(run("memory", "show", "ann", "--db", db).stdout)
    assert shown["weights"] == {"concise": 4.0, "expert": 6.0}
    rated = run(
        "memory",
        "feedback",
        "ann",
        "--response",
        "Paris.",
        "--rating",
        "up",
        "--model",
        model_folder,
        "--classifier",
        classifier_folder,
        "--db",
        db,
    )
    assert rated.exit_code == 0, rated.output
    bad = run("memory", "set", "ann", "concise=2", "--db", db)
    assert bad.exit_code == 2 and "InvalidProfileError" in bad.output
    history = json.loads(run("memory", "history", "ann", "--db", db).stdout)
    assert [h["action"] for h in history] == ["set", "learn", "feedback"]
    answer_ann = ("generate", "--model", model_folder, "--classifier", classifier_folder, "--prompt", "Hi")
    answer_ann += ("--user", "ann", "--db", db, "--max-new-tokens", 3)
    generated = json.loads(run(*answer_ann, "--json").stdout)
    assert generated["weights"] == json.loads(run("memory", "show", "ann", "--db", db).stdout)["weights"]
    assert generated["weights_source"] == "memory"
    prompted = run(*answer_ann, "--preference-prompt")
    assert prompted.exit_code == 0 and "(from memory)" in prompted.output
    exported = json.loads(run("memory", "export", "ann", "--db", db).stdout)
    assert len(exported["feedback"]) == 1
    assert json.loads(run("memory", "forget", "ann", "--db", db).stdout)["rows_deleted"] == 5
    assert json.loads(run("memory", "show", "ann", "--db", db).stdout)["known"] is False
