"""Does the engine tell the base model's disclaimers from its refusals (docs/classifier.md, session 53)?

On training-side instructions (``steering_probe.probe_instructions``) the base model's greedy answers are made
(or taken from the probes' cache); each that reads as a refusal is asked again, guided, and the engine's
decision is printed beside how that greedy answer opens, how long it runs and how it ends, to be read by hand:
a disclaimer the engine guides should go on to answer, one it leaves unguided should not. The last column says
whether the engine's answer is the greedy answer word for word, as a refusal's must be (since session 54 one that
the disclaimer's draft finds is taken from that draft, not decoded again).

    python benchmarks/disclaimer_probe.py default --all-kinds --prompts 100 --max-new-tokens 160
"""

from __future__ import annotations

import argparse
from pathlib import Path

from steering_probe import add_instruction_options, answered, probe_instructions, unguided_cache

from cliper_integrations.core.engine import DISCLAIMER_WARNING, CLIPerEngine, GenerationRequest
from cliper_integrations.evaluation.steering import EvalConfig, Job


def decision(weights_source: str, warnings: list[str]) -> str:
    """What the engine made of the row's opening."""
    if weights_source.startswith("none"):
        return "refusal: unguided"
    hedged = any(warning.startswith(DISCLAIMER_WARNING) for warning in warnings)
    return "disclaimer: guided from its opening" if hedged else "guided"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("classifier", help="a classifier folder, or 'default'")
    parser.add_argument("--class", dest="name", default="concise", help="the class a guided row asks for")
    parser.add_argument("--alpha", type=float, default=8.0)
    add_instruction_options(parser, prompts=100, max_new_tokens=160)
    args = parser.parse_args()
    prompts = probe_instructions(args.prompts, args.skip, args.all_kinds)
    engine = CLIPerEngine("embedded", classifier=args.classifier, dtype=args.dtype)
    config = EvalConfig(Path("unused"), max_new_tokens=args.max_new_tokens, batch_size=8)
    records = answered(engine, Job((), "unguided", 0.0), prompts, config, unguided_cache(engine, args.max_new_tokens))
    declining = [(prompt, record) for (_, prompt), record in zip(prompts, records, strict=True) if record["refusal"]]
    asked = {"weights": {args.name: args.alpha}, "max_new_tokens": args.max_new_tokens}
    requests = [GenerationRequest(prompt, **asked) for prompt, _ in declining]
    print(f"{len(declining)} of {len(prompts)} greedy answers read as refusals\n")
    print("| greedy answer opens | words | ends | engine | engine's answer is the greedy one |\n" + "| --- " * 5 + "|")
    for (_, record), result in zip(declining, engine.generate_batch(requests), strict=True):
        text, engine_says = record["response"], decision(result.weights_source, result.warnings)
        print(f"| {text[:70]!r} | {record['words']} | {text[-50:]!r} | {engine_says} | {result.text == text} |")


if __name__ == "__main__":
    main()
