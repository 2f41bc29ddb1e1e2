"""Quick steering probe on held-out *training-side* instructions (never the evaluation sets).

Used to choose classifier settings and α without looking at ``../shared/data/eval``: guidance (alone,
or with the request also in the prompt) at each α against unguided, on instructions from
``alpaca_train.jsonl`` beyond the first 3,000 of the seeded shuffle (data generation uses at most the first
600), measured like ``cliper eval``. With ``--setting prompt+guidance`` each class is also answered with the
prompt alone, and the row says whether guidance moves it further than the prompt does. Answers made
without guidance (unguided, prompt alone) depend only on the model, dtype and token budget, so they are
kept in ``runs/probe_cache/`` and a later probe reuses them instead of answering them again.

    python benchmarks/steering_probe.py runs/classifier --alphas 8 --prompts 6 --max-new-tokens 64
    python benchmarks/steering_probe.py default --setting prompt+guidance --alphas 2,4,8 --max-new-tokens 160
    python benchmarks/steering_probe.py default --all-kinds --prompts 24 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from teacher_guidance import TeacherGuidedClassifier
from tqdm.auto import tqdm

from cliper_integrations.core.engine import CLIPerEngine, GenerationResult
from cliper_integrations.core.prompting import Message, instruction_text
from cliper_integrations.evaluation.steering import (
    SETTINGS,
    TARGETS,
    EvalConfig,
    Job,
    ResponseStore,
    fluency,
    generate,
    guidance_of,
    moves_further,
    response_record,
    summarize,
    unguided_signature,
    verdict,
)

INSTRUCTIONS = Path("../shared/data/instructions/alpaca_train.jsonl")
QUESTION_WORDS = ("Explain", "Describe", "What", "Why", "How")
CACHE = Path("runs/probe_cache")
T = TypeVar("T")


def probe_instructions(count: int, skip: int = 0, all_kinds: bool = False) -> list[tuple[int, str]]:
    """(id, prompt) pairs from the part of the seeded shuffle that data generation never reaches: open
    questions without input, or (``all_kinds``) every kind Alpaca has, rewrites and instructions with an
    input too. The id is the instruction's place in the shuffle, the same whichever kinds are drawn."""
    records = [json.loads(line) for line in INSTRUCTIONS.read_text().splitlines() if line.strip()]
    random.Random(0).shuffle(records)
    chosen = [
        (place, instruction_text(r))
        for place, r in enumerate(records[3000:], start=3000)
        if all_kinds or (not r.get("input") and r["instruction"].split()[0] in QUESTION_WORDS)
    ]
    return chosen[skip : skip + count]


def probe_prompts(count: int, skip: int = 0, all_kinds: bool = False) -> list[str]:
    """The prompts of ``probe_instructions``."""
    return [prompt for _, prompt in probe_instructions(count, skip, all_kinds)]


def unguided_cache(engine: CLIPerEngine, max_new_tokens: int) -> ResponseStore:
    """The store of this model's, dtype's and token budget's answers made without guidance."""
    signature = unguided_signature(engine, INSTRUCTIONS, max_new_tokens)
    name = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]
    return ResponseStore(CACHE / f"{name}.jsonl", signature)


def generate_in_batches(
    engine: CLIPerEngine, prompts: Sequence[str | Sequence[Message]], job: Job, config: EvalConfig
) -> list[GenerationResult]:
    """``generate`` one engine batch at a time under a progress bar: the batches the engine itself makes
    of one job's rows, so the answers are the same, and a 100-prompt row shows how far it has come."""
    size = engine.max_batch_size
    results: list[GenerationResult] = []
    for start in tqdm(range(0, len(prompts), size), desc=job.key, unit="batch", leave=False):
        results += generate(engine, prompts[start : start + size], job, config)
    return results


def answered(
    engine: CLIPerEngine,
    job: Job,
    prompts: Sequence[tuple[int, str]],
    config: EvalConfig,
    cache: ResponseStore | None,
    system: str | None = None,
) -> list[dict]:
    """The job's answers to the prompts, with their metrics. With a ``cache`` (for jobs whose answers depend
    only on the model, as the unguided ones do) the stored answers are taken and only the missing ones are
    made and stored; without one every answer is made afresh. ``system`` puts a system message before each
    prompt."""
    missing = cache.missing(job, prompts) if cache is not None else prompts
    inputs: list[str | list[Message]] = [
        prompt if system is None else [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        for _, prompt in missing
    ]
    results = generate_in_batches(engine, inputs, job, config)
    guidance = guidance_of(engine, job)
    records = [response_record(engine, job, guidance, i, p, r) for (i, p), r in zip(missing, results, strict=True)]
    if cache is None:
        return records
    cache.add(records)
    return cache.responses(job, prompts)


def add_instruction_options(parser: argparse.ArgumentParser, prompts: int, max_new_tokens: int) -> None:
    """The options every probe on these instructions takes: which of them, how long an answer, and which
    dtype the model's weights load in."""
    parser.add_argument("--prompts", type=int, default=prompts)
    parser.add_argument("--skip", type=int, default=0, help="start after this many prompts (a fresh set of them)")
    parser.add_argument(
        "--all-kinds", action="store_true", help="draw every kind of instruction, not only open questions"
    )
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (the model's weights)")


def none_or(cast: Callable[[str], T]) -> Callable[[str], T | None]:
    """An argparse ``type`` for a setting that is a value or ``none`` (turned off)."""
    return lambda text: None if text == "none" else cast(text)


def _alphas(text: str) -> list[float | tuple[float, ...]]:
    """Comma-separated α values; one of them may give each class of a combination its own, joined by '/'
    in the combination's order (``4/16`` for ``concise+unfriendly``: concise 4, unfriendly 16)."""
    values = [tuple(float(part) for part in value.split("/")) for value in text.split(",")]
    return [value if len(value) > 1 else value[0] for value in values]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("classifier", help="a classifier folder, or 'default'")
    parser.add_argument(
        "--alphas", default="8", help="comma-separated α values; '/' gives each class of a combination its own"
    )
    parser.add_argument("--classes", default=",".join(TARGETS), help="comma-separated classes; '+' joins a combination")
    parser.add_argument("--setting", choices=("guidance", "prompt+guidance"), default="guidance")
    add_instruction_options(parser, prompts=6, max_new_tokens=64)
    parser.add_argument(
        "--plausibility",
        default=None,
        help="guided_plausibility: a number, or 'none' for no floor (default: the engine's)",
    )
    parser.add_argument(
        "--no-repeat-ngram",
        default=None,
        help="guided_no_repeat_ngram: the loop guard's n, or 'none' for no guard (default: the engine's)",
    )
    parser.add_argument(
        "--teacher",
        default=None,
        help="comma-separated classes whose posterior the prompted base model gives instead of the head "
        "(guidance alone; teacher_guidance.py)",
    )
    parser.add_argument("--show", type=int, default=0, help="print the first N characters of each first answer")
    parser.add_argument("--save", type=Path, help="append every answer with its metrics to this JSONL file")
    args = parser.parse_args()
    prompts = probe_instructions(args.prompts, args.skip, args.all_kinds)
    options = {"guided_plausibility": (args.plausibility, float), "guided_no_repeat_ngram": (args.no_repeat_ngram, int)}
    decoding = {name: none_or(cast)(text) for name, (text, cast) in options.items() if text is not None}
    if args.teacher and args.setting != "guidance":
        parser.error("--teacher reads the plain question as the row decoded: --setting guidance only")
    engine = CLIPerEngine("embedded", classifier=args.classifier, dtype=args.dtype, **decoding)
    if args.teacher:
        teacher = args.teacher.split(",")
        questions = [prompt for _, prompt in prompts]
        engine.classifier = TeacherGuidedClassifier(engine.classifier, engine.tokenizer, questions, teacher)
    config = EvalConfig(Path("unused"), max_new_tokens=args.max_new_tokens, batch_size=8)
    cache = unguided_cache(engine, args.max_new_tokens)

    def answer(job: Job) -> dict[str, float]:
        records = answered(engine, job, prompts, config, None if SETTINGS[job.setting]["guided"] else cache)
        if args.show:
            print(f"  [{job.key}] {records[0]['response'][: args.show]!r}", flush=True)
        if args.save:
            with args.save.open("a") as saved:
                saved.writelines(json.dumps(record) + "\n" for record in records)
        return summarize(records)

    unguided = answer(Job((), "unguided", 0.0))
    print("unguided", {name: round(value, 2) for name, value in unguided.items()}, flush=True)
    for spec in args.classes.split(","):
        names = tuple(spec.split("+"))
        # the prompt job's weight only says which classes to ask for (guidance is off)
        prompted = answer(Job(names, "prompt", 1.0)) if args.setting == "prompt+guidance" else None
        rows = [(f"{spec:>11} prompt", prompted)] if prompted else []
        jobs = [Job(names, args.setting, alpha) for alpha in _alphas(args.alphas)]
        rows += [(f"{spec:>11} α={job.key.rsplit('|', 1)[1]}", answer(job)) for job in jobs]
        for label, row in rows:
            verdicts = "  ".join(verdict(name, unguided, row) for name in names)
            compared = prompted is not None and row is not prompted
            further = "  ".join(f"vs prompt {moves_further(n, prompted, row)}" for n in names) if compared else ""
            print(
                f"{label}: {verdicts}  {further}  {fluency(unguided, row)}  words {row['words']:.1f} "
                f"fk {row['fk_grade']:.1f} vader {row['vader']:.2f} ppl {row['perplexity']:.2f} "
                f"distinct-2 {row['distinct2']:.2f} refusals {row['refusals']:.2f} "
                f"stopped short {row['stopped_short']:.2f} unfinished {row['unfinished']:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
