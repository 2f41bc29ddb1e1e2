"""Which candidate tokens a bayes-form classifier pushes towards one class over another, and how much the
prefix matters to that, on held-out *training-side* instructions (never the evaluation sets).

Guidance reorders the base model's top-k candidates by log p_cls(c | prefix, x). Along the base model's
own unguided answers, this reads, at every step, each candidate's margin log p_cls(a | prefix, x) −
log p_cls(b | prefix, x) less its mean over that step's candidates (what reordering sees), and lists the
tokens with the largest mean margin each way among those that were candidates often. It also reads the
margins again with every step's prefix state swapped for another step's: a centred cosine near 1 between
the two says the head's push is a fixed preference over tokens, whatever the text says so far.

    python benchmarks/head_lexicon.py default --pair friendly,unfriendly --prompts 24
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from steering_probe import probe_prompts

from cliper_integrations.core.engine import CLIPerEngine, GenerationRequest
from cliper_integrations.core.preferences import AXES
from cliper_integrations.training.trainer import encode_rows


def centred_margins(log_cls: torch.Tensor, pair: tuple[int, int]) -> torch.Tensor:
    """Each candidate's margin log p_cls(a | prefix, x) − log p_cls(b | prefix, x), less its step's mean
    [T, k], from the class log-probs of the candidates [T, k, K]."""
    margin = log_cls[..., pair[0]] - log_cls[..., pair[1]]
    return margin - margin.mean(-1, keepdim=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("classifier", help="a classifier folder, or 'default'")
    parser.add_argument(
        "--pair", action="append", help="a,b: the class pushed towards and the one read against (default: each axis)"
    )
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--min-count", type=int, default=5, help="list tokens that were candidates this often")
    parser.add_argument("--show", type=int, default=15)
    args = parser.parse_args()
    pairs = [spec.split(",") for spec in args.pair or [",".join(poles) for poles in AXES.values()]]
    if any(len(pair) != 2 for pair in pairs):
        parser.error("--pair takes two class names joined by a comma, e.g. friendly,unfriendly")

    torch.manual_seed(0)
    engine = CLIPerEngine("embedded", classifier=args.classifier)
    classes = list(engine.classifier.classes)
    if unknown := {name for pair in pairs for name in pair} - set(classes):
        parser.error(f"not classes of this classifier: {sorted(unknown)}; it has {classes}")
    prompts = probe_prompts(args.prompts)
    answers = engine.generate_batch(
        [GenerationRequest(p, weights={}, max_new_tokens=args.max_new_tokens) for p in prompts]
    )
    classifier = engine.classifier
    # the states before each answer token (prompt without any request), read as the trainer reads them
    rows = [
        {"prompt": p, "response": a.text, "truncated": a.finish_reason == "length"}
        for p, a in zip(prompts, answers, strict=True)
    ]
    read = encode_rows(classifier, engine.loaded, rows, cache=None)
    states = torch.cat([features["hidden"] for features in read]).float()
    next_ids = torch.cat([features["next_ids"] for features in read])
    swapped = states[torch.randperm(len(states))]
    candidates, candidate_log_lm, _ = classifier.base_candidates(states, next_ids, args.candidates)
    with torch.no_grad():
        log_cls = classifier.log_probs(states, candidates, candidate_log_lm)
        log_cls_swapped = classifier.log_probs(swapped, candidates, candidate_log_lm)
    print(f"{len(prompts)} training-side prompts, {len(states)} steps of the base model's unguided answers")
    for first, second in pairs:
        pair = (classes.index(first), classes.index(second))
        margins, margins_swapped = centred_margins(log_cls, pair), centred_margins(log_cls_swapped, pair)
        cosine = torch.nn.functional.cosine_similarity(margins, margins_swapped, dim=-1).mean().item()
        by_token: dict[int, list[float]] = defaultdict(list)
        for token, margin in zip(candidates.flatten().tolist(), margins.flatten().tolist(), strict=True):
            by_token[token].append(margin)
        frequent = {t: sum(m) / len(m) for t, m in by_token.items() if len(m) >= args.min_count}
        ranked = [(engine.tokenizer.decode([t]), frequent[t]) for t in sorted(frequent, key=frequent.get, reverse=True)]
        print(f"\n{first} over {second}: centred cosine of the margins with swapped prefix states {cosine:.2f}")
        print("  raised most: " + " | ".join(f"{text!r} {m:+.2f}" for text, m in ranked[: args.show]))
        print("  lowered most: " + " | ".join(f"{text!r} {m:+.2f}" for text, m in ranked[::-1][: args.show]))


if __name__ == "__main__":
    main()
