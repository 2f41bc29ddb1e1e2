"""Decoding speed of the embedded model in float32 and bfloat16, through the engine, measured in one run.

    python benchmarks/dtype_speed.py [--without-contiguous-copy]

Eight chat prompts in one batch, 96 greedy new tokens each, through ``CLIPerEngine.generate_batch`` with
the packaged classifier: unguided, and guided (expert, α = 8). float32, bfloat16, then float32 again so
that drift of a noisy machine shows; also prints each run's first answer's opening, to see whether
bfloat16 changes the greedy text. ``--without-contiguous-copy`` adds a bfloat16 run with the model's
output projection fed ``generate``'s strided slice as it is (``models._contiguous_input`` removed), to
show what that copy is for.
"""

from __future__ import annotations

import argparse
import time

from cliper_integrations.core import models
from cliper_integrations.core.engine import CLIPerEngine, GenerationRequest

PROMPTS = ["Explain how rain forms.", "What is a binary tree?", "Give three tips for sleep.", "Describe Paris."] * 2
NEW_TOKENS = 96
SETTINGS = {"unguided": {}, "guided (expert, α = 8)": {"expert": 8.0}}


def _measure(engine: CLIPerEngine, label: str) -> None:
    for setting, weights in SETTINGS.items():
        requests = [
            GenerationRequest(p, weights=weights, guidance=bool(weights), max_new_tokens=NEW_TOKENS) for p in PROMPTS
        ]
        engine.generate_batch(requests[:2])  # warm-up
        started = time.perf_counter()
        results = engine.generate_batch(requests)
        seconds = time.perf_counter() - started
        tokens = sum(result.completion_tokens for result in results)
        print(f"| {label} | {setting} | {tokens / seconds:.1f} | {results[0].text[:48]!r} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--without-contiguous-copy", action="store_true")
    args = parser.parse_args()
    print("| dtype | setting | tokens/s | first answer's opening |\n| --- | --- | --- | --- |")
    for dtype in ("float32", "bfloat16", "float32"):
        _measure(CLIPerEngine("embedded", classifier="default", dtype=dtype), dtype)
    if args.without_contiguous_copy:
        engine = CLIPerEngine("embedded", classifier="default", dtype="bfloat16")
        hooks = engine.model.get_output_embeddings()._forward_pre_hooks
        for handle in [key for key, hook in hooks.items() if hook is models._contiguous_input]:
            del hooks[handle]
        _measure(engine, "bfloat16, strided slice as it is")


if __name__ == "__main__":
    main()
