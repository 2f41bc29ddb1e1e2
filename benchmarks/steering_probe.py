"""Quick steering probe on held-out *training-side* instructions (never the evaluation sets).

Used to choose classifier settings and α without looking at ``../shared/data/eval``: guidance alone at
each α against unguided, on instructions from ``alpaca_train.jsonl`` beyond the first 3,000 of the
seeded shuffle (data generation uses at most the first 600), measured like ``cliper eval``.

    python benchmarks/steering_probe.py runs/classifier --alphas 8 --prompts 6 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from cliper_integrations.core.engine import CLIPerEngine
from cliper_integrations.core.prompting import instruction_text
from cliper_integrations.evaluation.steering import (
    TARGETS,
    EvalConfig,
    Job,
    generate,
    response_record,
    summarize,
    verdict,
)

INSTRUCTIONS = Path("../shared/data/instructions/alpaca_train.jsonl")
QUESTION_WORDS = ("Explain", "Describe", "What", "Why", "How")


def probe_prompts(count: int, skip: int = 0) -> list[str]:
    """Open questions (no input) from the part of the seeded shuffle that data generation never reaches."""
    records = [json.loads(line) for line in INSTRUCTIONS.read_text().splitlines() if line.strip()]
    random.Random(0).shuffle(records)
    chosen = [r for r in records[3000:] if not r.get("input") and r["instruction"].split()[0] in QUESTION_WORDS]
    return [instruction_text(r) for r in chosen[skip : skip + count]]


def _floor(value: str) -> float | None:
    return None if value == "none" else float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("classifier", help="a classifier folder, or 'default'")
    parser.add_argument("--alphas", default="8", help="comma-separated α values")
    parser.add_argument("--classes", default=",".join(TARGETS), help="comma-separated classes; '+' joins a combination")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--skip", type=int, default=0, help="start after this many prompts (a fresh set of them)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--plausibility",
        default=None,
        help="guided_plausibility: a number, or 'none' for no floor (default: the engine's)",
    )
    parser.add_argument("--show", type=int, default=0, help="print the first N characters of each first answer")
    args = parser.parse_args()
    prompts = probe_prompts(args.prompts, args.skip)
    floor = {} if args.plausibility is None else {"guided_plausibility": _floor(args.plausibility)}
    engine = CLIPerEngine("embedded", classifier=args.classifier, **floor)
    config = EvalConfig(Path("unused"), max_new_tokens=args.max_new_tokens, batch_size=8)

    def answer(job: Job) -> dict[str, float]:
        results = generate(engine, prompts, job, config)
        if args.show:
            print(f"  [{job.key}] {results[0].text[: args.show]!r}", flush=True)
        return summarize(
            [response_record(engine, job, i, p, r) for i, (p, r) in enumerate(zip(prompts, results, strict=True))]
        )

    unguided = answer(Job((), "unguided", 0.0))
    print("unguided", {name: round(value, 2) for name, value in unguided.items()}, flush=True)
    for spec in args.classes.split(","):
        names = tuple(spec.split("+"))
        for alpha in (float(a) for a in args.alphas.split(",")):
            row = answer(Job(names, "guidance", alpha))
            verdicts = "  ".join(verdict(name, unguided, row) for name in names)
            print(
                f"{spec:>11} α={alpha}: {verdicts}  words {row['words']:.1f} "
                f"fk {row['fk_grade']:.1f} vader {row['vader']:.2f} ppl {row['perplexity']:.1f} "
                f"distinct-2 {row['distinct2']:.2f} refusals {row['refusals']:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
