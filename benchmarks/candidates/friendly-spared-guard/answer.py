"""Friendly guidance alone at α = 16 under the favourite-sparing loop guard, on alpaca_test100 (session 38).

A measurement of a decoding rule that is not shipped (``benchmarks/loop_guard_probe.py``), written to its own
store here, never into ``docs/``: the answers are made as ``cliper eval`` makes its guided rows (same
``generate`` and ``response_record``), with the engine's processor swapped for one whose loop guard spares
the base model's favourite token. Resumable: answers already in the store are skipped.

    python benchmarks/candidates/friendly-spared-guard/answer.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent.parent))

from loop_guard_probe import favourite_sparing_guard  # noqa: E402

import cliper_integrations.core.engine as engine_module  # noqa: E402
from cliper_integrations.core.engine import CLIPerEngine  # noqa: E402
from cliper_integrations.evaluation.steering import (  # noqa: E402
    EvalConfig,
    Job,
    generate,
    guidance_of,
    load_prompts,
    response_record,
)

PROMPTS = Path("../shared/data/eval/alpaca_test100.json")
STORE = HERE / "responses.jsonl"
JOB = Job(("friendly",), "guidance", 16.0)


def main() -> None:
    engine_module.ClassifierGuidedLogitsProcessor = favourite_sparing_guard(None)
    engine = CLIPerEngine("embedded")
    config = EvalConfig(PROMPTS, max_new_tokens=160, batch_size=8)
    done = {json.loads(line)["prompt_id"] for line in STORE.read_text().splitlines()} if STORE.exists() else set()
    prompts = [(pid, prompt) for pid, prompt in load_prompts(PROMPTS, None) if pid not in done]
    guidance = guidance_of(engine, JOB)
    for start in range(0, len(prompts), config.batch_size):
        chunk = prompts[start : start + config.batch_size]
        results = generate(engine, [prompt for _, prompt in chunk], JOB, config)
        records = [
            response_record(engine, JOB, guidance, pid, p, r) for (pid, p), r in zip(chunk, results, strict=True)
        ]
        with STORE.open("a") as handle:
            handle.write("".join(json.dumps({**r, "loop_guard": "spares favourite"}) + "\n" for r in records))
        print(f"{start + len(chunk)} of {len(prompts)}", flush=True)


if __name__ == "__main__":
    main()
