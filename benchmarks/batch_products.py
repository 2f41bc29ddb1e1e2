"""Decoding speed per batch size with the loaded model's ``FewRowLinear`` products and with ``nn.Linear``'s own.

Every ``nn.Linear`` of a loaded model multiplies a decoding step's few rows with the weight on the left
(``cliper_integrations.core.models.FewRowLinear``). Here the first N requests of the bench's batch (guided,
and unguided) are decoded both ways, interleaved on one loaded model, ``--repeats`` times; medians of tokens
over the call's wall clock, and whether the two ways gave the same answers (``same_texts``, first repeat).

    python benchmarks/batch_products.py --batch-sizes 1 2 3 4 8 --repeats 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

import torch

from cliper_integrations.core.engine import CLIPerEngine, GenerationRequest
from cliper_integrations.core.models import FewRowLinear
from cliper_integrations.evaluation.bench import BENCH_PROMPTS, batch_of_eight, timed_batch


def use_products(model: torch.nn.Module, kind: type[torch.nn.Linear]) -> None:
    """Make every linear layer of ``model`` compute as ``kind`` (same parameters)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.__class__ = kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    engine = CLIPerEngine("embedded", classifier="default")
    engine.generate(GenerationRequest(BENCH_PROMPTS[0], max_new_tokens=8))  # warm-up
    products = {"FewRowLinear": FewRowLinear, "nn.Linear": torch.nn.Linear}
    speeds: dict[str, list[float]] = {}
    texts: dict[str, dict[str, list[str]]] = {}
    try:
        for _, size, guided, (label, kind) in itertools.product(
            range(args.repeats), args.batch_sizes, (True, False), products.items()
        ):
            use_products(engine.model, kind)
            key = f"{size} {'guided' if guided else 'unguided'}"
            speed, results = timed_batch(engine, batch_of_eight(args.max_new_tokens, guided)[:size])
            speeds.setdefault(f"{key} {label}", []).append(speed)
            texts.setdefault(key, {}).setdefault(label, [result.text for result in results])
    finally:
        use_products(engine.model, FewRowLinear)
    medians = {key: round(statistics.median(values), 2) for key, values in speeds.items()}
    same = {key: len(set(map(tuple, both.values()))) == 1 for key, both in texts.items()}
    print(json.dumps({"tok_s": medians, "same_texts": same, "runs": speeds}))


if __name__ == "__main__":
    main()
