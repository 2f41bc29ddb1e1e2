"""Probe rows pooled over several sets of instructions: ``summarize`` over every answer the ``--save`` files hold.

``steering_probe.py --save FILE`` appends each answer with its metrics; rows answered on different sets of
instructions (``--skip``) land in different files. This reads them all, keeps one answer per (instruction,
job, guidance digest: two classifiers' rows at the same α stay apart), and prints each row's figures over all
its answers against the unguided answers to the same instructions, as ``steering_probe.py`` prints one set's.

    python benchmarks/pooled_probe.py runs/lt_alone6.jsonl runs/lt_alone6_b.jsonl runs/v18_alone.jsonl \\
        runs/v18_alone_b.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from cliper_integrations.evaluation.steering import TARGETS, Job, fluency, summarize, verdict

UNGUIDED = Job((), "unguided", 0.0).key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("saved", nargs="+", type=Path, help="JSONL files written by steering_probe.py --save")
    args = parser.parse_args()
    answers: dict[tuple[str, str | None], dict[int, dict]] = defaultdict(dict)
    for path in args.saved:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            answers[record["job"], record["guidance"]][record["prompt_id"]] = record
    unguided = answers.pop((UNGUIDED, None))
    for (key, guidance), by_prompt in answers.items():
        if missing := set(by_prompt) - set(unguided):
            raise SystemExit(f"{key}: no unguided answer to instructions {sorted(missing)}")
        base = summarize([unguided[prompt_id] for prompt_id in by_prompt])
        row = summarize(list(by_prompt.values()))
        names = [name for name in Job.from_key(key).classes if name in TARGETS]
        verdicts = "  ".join(verdict(name, base, row) for name in names)
        print(
            f"{key} (guidance {str(guidance)[:8]}) over {len(by_prompt)} instructions: {verdicts}  "
            f"{fluency(base, row)}  words {row['words']:.1f} "
            f"(unguided {base['words']:.1f}) ppl {row['perplexity']:.2f} (unguided {base['perplexity']:.2f}) "
            f"fk {row['fk_grade']:.2f} (unguided {base['fk_grade']:.2f}) "
            f"stopped short {row['stopped_short']:.2f} unfinished {row['unfinished']:.2f} "
            f"refusals {row['refusals']:.2f}"
        )


if __name__ == "__main__":
    main()
