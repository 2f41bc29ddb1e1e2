"""``cliper eval``: does guidance move the answers the way each class asks, and at what fluency cost?

For each class (and a few combinations) four settings are compared on evaluation prompts: unguided,
preference prompting only, guidance only, prompting plus guidance; then an α sweep. Metrics come from
independent libraries (``metrics.py``). Writes a Markdown report and PNG plots.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from cliper_integrations.core.engine import CLIPerEngine, GenerationRequest
from cliper_integrations.evaluation.metrics import distinct_n, fk_grade, perplexity, vader_compound, word_count
from cliper_integrations.training.data import is_refusal

SETTINGS = {
    "unguided": {"guided": False, "prompted": False},
    "prompt": {"guided": False, "prompted": True},
    "guidance": {"guided": True, "prompted": False},
    "prompt+guidance": {"guided": True, "prompted": True},
}
# What each class should move, and the target ratio/difference against unguided (from the issue).
TARGETS = {
    "concise": ("words", "ratio<=", 0.6),
    "informative": ("words", "ratio>=", 1.3),
    "elementary": ("fk_grade", "diff<=", -2.0),
    "expert": ("fk_grade", "diff>=", 2.0),
    "friendly": ("vader", "diff>=", 0.2),
    "unfriendly": ("vader", "diff<=", -0.2),
}
COMBINATIONS = [("concise", "friendly"), ("elementary", "friendly"), ("expert", "informative", "unfriendly")]


@dataclass
class EvalConfig:
    prompts_file: Path
    output: Path = Path("docs")
    limit: int | None = None
    alpha: float = 8.0
    sweep: tuple[float, ...] = (0.0, 2.0, 4.0, 8.0, 16.0)
    max_new_tokens: int = 160
    batch_size: int = 8
    classes: tuple[str, ...] = tuple(TARGETS)
    combinations: list[tuple[str, ...]] = field(default_factory=lambda: list(COMBINATIONS))


def load_prompts(path: Path, limit: int | None) -> list[str]:
    records = json.loads(path.read_text())
    return [record["prompt"] for record in records][:limit]


def measure(engine: CLIPerEngine, prompts: list[str], responses: list[str]) -> dict[str, float]:
    return {
        "words": statistics.mean(word_count(r) for r in responses),
        "fk_grade": statistics.mean(fk_grade(r) for r in responses),
        "vader": statistics.mean(vader_compound(r) for r in responses),
        "distinct2": distinct_n(responses, 2),
        "perplexity": statistics.median(perplexity(engine, p, r) for p, r in zip(prompts, responses, strict=True)),
        # guidance must not buy its style by declining the task (DESIGN.md: refusals were distinctive)
        "refusals": statistics.mean(is_refusal(r) for r in responses),
    }


def generate(
    engine: CLIPerEngine,
    prompts: list[str],
    weights: dict[str, float],
    guided: bool,
    prompted: bool,
    config: EvalConfig,
) -> list[str]:
    requests = [
        GenerationRequest(
            prompt, weights=weights, guidance=guided, preference_prompt=prompted, max_new_tokens=config.max_new_tokens
        )
        for prompt in prompts
    ]
    results = []
    for start in range(0, len(requests), config.batch_size):
        results.extend(engine.generate_batch(requests[start : start + config.batch_size]))
    return [result.text for result in results]


def _ratio(value: float, reference: float) -> float:
    return value / reference if reference else float("nan")


def verdict(name: str, base: dict[str, float], row: dict[str, float]) -> str:
    """The class's target metric against ``base`` (ratio or difference) and whether the target is met."""
    metric, rule, target = TARGETS[name]
    if rule.startswith("ratio"):
        value = _ratio(row[metric], base[metric])
        met = value <= target if rule == "ratio<=" else value >= target
        return f"{value:.2f}× {'✔' if met else '✘'}"
    value = row[metric] - base[metric]
    met = value <= target if rule == "diff<=" else value >= target
    return f"{value:+.2f} {'✔' if met else '✘'}"


def moves_further(name: str, prompt_only: dict[str, float], combined: dict[str, float]) -> str:
    """Does adding guidance to the prompt move the class's metric further in the requested direction?"""
    metric, rule, _ = TARGETS[name]
    delta = combined[metric] - prompt_only[metric]
    right = delta < 0 if rule.endswith("<=") else delta > 0
    return f"{delta:+.2f} {'✔' if right else '✘'}"


def fluency(base: dict[str, float], row: dict[str, float]) -> str:
    """Perplexity ≤ 1.5× and distinct-2 ≥ 0.9× the unguided answers."""
    ppl, distinct = _ratio(row["perplexity"], base["perplexity"]), _ratio(row["distinct2"], base["distinct2"])
    return f"ppl {ppl:.2f}× {'✔' if ppl <= 1.5 else '✘'}, distinct-2 {distinct:.2f}× {'✔' if distinct >= 0.9 else '✘'}"


def run_eval(engine: CLIPerEngine, config: EvalConfig) -> dict:
    """Generate, measure, plot and write the report; returns all numbers."""
    prompts = load_prompts(config.prompts_file, config.limit)
    jobs = [((name,), setting) for name in config.classes for setting in SETTINGS if setting != "unguided"]
    jobs += [(combo, "prompt+guidance") for combo in config.combinations]
    # α = 0 is the unguided run and α = config.alpha the "guidance" setting: both are measured once.
    sweep_jobs = [
        ((name,), alpha) for name in config.classes for alpha in config.sweep if alpha not in (0, config.alpha)
    ]
    bar = tqdm(total=1 + len(jobs) + len(sweep_jobs), desc="Evaluating", unit="setting")
    unguided = measure(engine, prompts, generate(engine, prompts, {}, False, False, config))
    bar.update()
    table: dict[str, dict[str, dict[str, float]]] = {}
    for classes, setting in jobs:
        weights = dict.fromkeys(classes, config.alpha)
        flags = SETTINGS[setting]
        responses = generate(engine, prompts, weights, flags["guided"], flags["prompted"], config)
        table.setdefault("+".join(classes), {})[setting] = measure(engine, prompts, responses)
        bar.update()
    sweep: dict[str, dict[float, dict[str, float]]] = {
        name: {0.0: unguided, config.alpha: table[name]["guidance"]} for name in config.classes
    }
    for (name,), alpha in sweep_jobs:
        sweep[name][alpha] = measure(engine, prompts, generate(engine, prompts, {name: alpha}, True, False, config))
        bar.update()
    bar.close()
    results = {
        "prompts": len(prompts),
        "file": str(config.prompts_file),
        "alpha": config.alpha,
        "unguided": unguided,
        "table": table,
        "sweep": {k: {str(a): v for a, v in s.items()} for k, s in sweep.items()},
    }
    config.output.mkdir(parents=True, exist_ok=True)
    plot_sweep(sweep, config.output / "results_alpha_sweep.png")
    (config.output / "results.json").write_text(json.dumps(results, indent=2))
    write_report(config.output / "results.md", report(results, config))
    return results


def plot_sweep(sweep: dict[str, dict[float, dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["words", "fk_grade", "vader", "distinct2", "perplexity"]
    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.5))
    for axis, metric in zip(axes, metrics, strict=True):
        for name, points in sweep.items():
            alphas = sorted(points)
            axis.plot(alphas, [points[a][metric] for a in alphas], marker="o", label=name)
        axis.set_title(metric)
        axis.set_xlabel("α (guidance only)")
    axes[0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


NOTES_MARKER = "<!-- Notes below this line are written by hand and kept when `cliper eval` rewrites the page. -->"


def write_report(path: Path, text: str) -> None:
    """Write the generated report, keeping the hand-written notes (why a target was missed) of a previous run."""
    notes = NOTES_MARKER + "\n"
    if path.exists() and NOTES_MARKER in (previous := path.read_text()):
        notes = previous[previous.index(NOTES_MARKER) :]
    path.write_text(text + "\n" + notes)


def report(results: dict, config: EvalConfig) -> str:
    base = results["unguided"]
    lines = [
        "# Steering results",
        "",
        f"Generated by `cliper eval` on `{results['file']}` ({results['prompts']} prompts), greedy decoding, "
        f"at most {config.max_new_tokens} new tokens, α = {config.alpha} per requested class.",
        "",
        "Unguided: " + ", ".join(f"{k} {v:.2f}" for k, v in base.items()),
        "",
        "| classes | setting | words | FK grade | VADER | distinct-2 | perplexity | refusals | target vs unguided |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for classes, settings in results["table"].items():
        for setting, row in settings.items():
            target = verdict(classes, base, row) if classes in TARGETS else ""
            lines.append(
                f"| {classes} | {setting} | {row['words']:.1f} | {row['fk_grade']:.2f} | {row['vader']:.3f} | "
                f"{row['distinct2']:.3f} | {row['perplexity']:.2f} | {row['refusals']:.0%} | {target} |"
            )
    lines += [
        "",
        "## Targets (guided vs unguided; prompting plus guidance vs prompting alone)",
        "",
        "| class | guidance | prompt+guidance | prompt+guidance vs prompt | fluency (guidance) "
        "| fluency (prompt+guidance) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in TARGETS:
        if name in results["table"]:
            row = results["table"][name]
            lines.append(
                f"| {name} | {verdict(name, base, row['guidance'])} | {verdict(name, base, row['prompt+guidance'])} | "
                f"{moves_further(name, row['prompt'], row['prompt+guidance'])} | {fluency(base, row['guidance'])} | "
                f"{fluency(base, row['prompt+guidance'])} |"
            )
    lines += ["", "![metrics against α](results_alpha_sweep.png)", ""]
    return "\n".join(lines)
