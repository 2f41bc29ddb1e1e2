"""How much of what a request does to the next token a taught head predicts, on class answers and on the
base model's own.

A teacher-taught head (``cliper train --teacher``) learns, at each position of an answer, the base model's
candidate distribution with the class's request in the prompt. It is taught on the answers in the data,
written *with* a request; guidance meets the base model's own answers, written without one. For each
teacher class this prints, over the base model's top-32 candidates, KL(prompted model || base model)
(how far the request moves the next token) and KL(prompted model || head) (what the head leaves of that),
and the share closed, on (1) the validation split's answers on the class's axis (as ``cliper train``
splits and filters them) and (2) the base model's unguided answers to the training-side instructions
``steering_probe.py`` draws (from its cache, ``runs/probe_cache``; refusals left out). If the head closes
much less of the gap on (2), its teacher data, not its form, is what limits guidance.

    python benchmarks/teacher_gap.py default --classes friendly,unfriendly --all-kinds --prompts 100
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from steering_probe import add_instruction_options, probe_instructions, unguided_cache

from cliper_integrations.core.classifier import PreferenceClassifier
from cliper_integrations.core.engine import CLIPerEngine
from cliper_integrations.evaluation.steering import Job
from cliper_integrations.training.data import keep_contrasting
from cliper_integrations.training.trainer import (
    Features,
    TrainConfig,
    encode_rows,
    load_rows,
    split_by_instruction,
    teach_rows,
    teacher_divergence,
)


def gaps(classifier: PreferenceClassifier, features: list[Features], name: str) -> tuple[float, float]:
    """Mean KL(prompted || base) and KL(prompted || head) per position, over ``features`` taught for ``name``."""
    stacked = {key: torch.cat([f[key] for f in features]) for key in ("hidden", "candidates", "candidate_log_lm")}
    stacked["hidden"] = stacked["hidden"].float()
    teacher = torch.cat([f[f"teacher.{name}"] for f in features]).unsqueeze(-1)
    with torch.no_grad():
        base, count = teacher_divergence(None, stacked, teacher, (name,))
        head, _ = teacher_divergence(classifier, stacked, teacher, (name,))
    return base.item() / count, head.item() / count


def unguided_rows(engine: CLIPerEngine, args: argparse.Namespace) -> list[dict]:
    """The base model's cached unguided answers to the probe's instructions, as training rows (no refusals)."""
    prompts = probe_instructions(args.prompts, args.skip, args.all_kinds)
    store = unguided_cache(engine, args.max_new_tokens)
    if missing := store.missing(Job((), "unguided", 0.0), prompts):
        raise SystemExit(f"{len(missing)} unguided answers are not cached: run steering_probe.py with these options")
    records = store.responses(Job((), "unguided", 0.0), prompts)
    return [
        {"prompt": prompt, "response": r["response"], "truncated": r["finish_reason"] == "length", "class": "unguided"}
        for (_, prompt), r in zip(prompts, records, strict=True)
        if not r["refusal"]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("classifier", help="a classifier folder, or 'default'")
    parser.add_argument("--classes", default="friendly,unfriendly", help="the teacher classes to measure")
    parser.add_argument("--data", type=Path, action="append", help="training data files (default: both shipped)")
    add_instruction_options(parser, prompts=100, max_new_tokens=160)
    parser.add_argument("--feature-cache", type=Path, default=Path("runs/features"))
    args = parser.parse_args()
    engine = CLIPerEngine("embedded", classifier=args.classifier, dtype=args.dtype)
    classifier, base = engine.classifier, engine.loaded
    names = tuple(args.classes.split(","))
    data = args.data or [Path("data/train_generations.jsonl"), Path("data/train_generations_smollm2.jsonl")]
    config = TrainConfig(data=data, output=Path("unused"))
    rows, _ = load_rows(config.data, config.classes)
    validation, _ = keep_contrasting(split_by_instruction(rows, config.val_fraction, config.seed)[1])
    own = unguided_rows(engine, args)
    for label, chosen, answers in (("validation answers on the axis", validation, "axis"), ("unguided", own, "all")):
        if answers == "axis":
            chosen = [row for row in chosen if row["class"] in names]
        features = encode_rows(classifier, base, chosen, args.feature_cache, candidates=config.candidates)
        teach_rows(classifier, base, chosen, features, args.feature_cache, names, answers)
        for name in names:
            moved, left = gaps(classifier, features, name)
            print(
                f"{label} ({len(chosen)}), {name}: KL(prompted || base) {moved:.4f}, KL(prompted || head) "
                f"{left:.4f}, closed {1 - left / moved:.1%}",
                flush=True,
            )


if __name__ == "__main__":
    main()
