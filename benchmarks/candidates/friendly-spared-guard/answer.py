"""Friendly guidance alone at α = 16 under the favourite-sparing loop guard, on alpaca_test100 (session 38).

A measurement of a decoding rule that is not shipped (``benchmarks/loop_guard_probe.py``), kept in a store of
its own here, never in ``docs/``: the answers are made as ``cliper eval`` makes its guided rows (same
``generate``, ``response_record`` and ``ResponseStore``), with the engine's processor swapped for one whose
loop guard spares the base model's favourite token; the store's signature says so (``loop_guard``). The
unguided answers are taken from ``docs/``, so the store compares with itself. Resumable.

    python benchmarks/candidates/friendly-spared-guard/answer.py
    python benchmarks/compare_runs.py benchmarks/candidates/friendly-spared-guard/results_responses.jsonl
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent.parent))

from loop_guard_probe import favourite_sparing_guard  # noqa: E402

import cliper_integrations.core.engine as engine_module  # noqa: E402
from cliper_integrations.core.engine import CLIPerEngine  # noqa: E402
from cliper_integrations.evaluation.steering import (  # noqa: E402
    RESPONSES_FILE,
    EvalConfig,
    Job,
    ResponseStore,
    generate,
    guidance_of,
    load_prompts,
    response_record,
    run_signature,
)

PROMPTS = Path("../shared/data/eval/alpaca_test100.json")
JOB = Job(("friendly",), "guidance", 16.0)
UNGUIDED = Job((), "unguided", 0.0)


def main() -> None:
    engine_module.ClassifierGuidedLogitsProcessor = favourite_sparing_guard(None)
    engine = CLIPerEngine("embedded")
    config = EvalConfig(PROMPTS, output=HERE, max_new_tokens=160, batch_size=8)
    signature = {**run_signature(engine, config), "loop_guard": "spares favourite"}
    store = ResponseStore(HERE / RESPONSES_FILE, signature)
    store.adopt(Path("docs") / RESPONSES_FILE, {UNGUIDED: None})
    guidance = guidance_of(engine, JOB)
    missing = store.missing(JOB, load_prompts(PROMPTS, None))
    for start in range(0, len(missing), config.batch_size):
        chunk = missing[start : start + config.batch_size]
        results = generate(engine, [prompt for _, prompt in chunk], JOB, config)
        store.add([response_record(engine, JOB, guidance, i, p, r) for (i, p), r in zip(chunk, results, strict=True)])
        print(f"{start + len(chunk)} of {len(missing)}", flush=True)


if __name__ == "__main__":
    main()
