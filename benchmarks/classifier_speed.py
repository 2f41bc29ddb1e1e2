"""Batched decoding speed of two classifiers on one loaded model, interleaved in one run.

`cliper bench` measures one classifier; comparing two of its runs mixes in this machine's run-to-run
noise. Here the model is loaded once and the bench's batch of 8 differently weighted requests is decoded
unguided, then guided by each classifier in turn, ``--repeats`` times; medians of tokens/s. With
``--disclaimer-tokens N`` the batch's second request asks the bench's ``DISCLAIMER_PROMPT`` for N tokens instead
(the engine drafts it past its disclaimer before guiding it).

    python benchmarks/classifier_speed.py default /tmp/v11 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics

from cliper_integrations.core.classifier import PreferenceClassifier
from cliper_integrations.core.engine import CLIPerEngine, GenerationRequest
from cliper_integrations.evaluation.bench import BENCH_PROMPTS, batch_of_eight, tokens_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("classifiers", nargs="+", help="classifier folders, or 'default'")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--disclaimer-tokens", type=int, default=None)
    args = parser.parse_args()
    engine = CLIPerEngine("embedded", classifier=args.classifiers[0])
    engines = {"unguided": engine}
    for spec in args.classifiers:
        engines[spec] = copy.copy(engine)
        if spec != args.classifiers[0]:
            engines[spec].classifier = PreferenceClassifier.load(spec, engine.loaded).eval()

    engine.generate(GenerationRequest(BENCH_PROMPTS[0], max_new_tokens=8))  # warm-up
    speeds: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, each in engines.items():
            batch = batch_of_eight(args.max_new_tokens, name != "unguided", args.disclaimer_tokens)
            speeds[name].append(tokens_per_second(each, batch))
    medians = {name: round(statistics.median(values), 2) for name, values in speeds.items()}
    print(json.dumps({"batch8_tok_s": medians, "runs": speeds}))


if __name__ == "__main__":
    main()
