"""Compare two ``cliper eval`` runs answer by answer: how many greedy answers are the same, and how far
each setting's metrics moved (for example float32 against bfloat16, or one classifier against another).

    python benchmarks/compare_runs.py docs/results_responses.jsonl docs/results_bfloat16/results_responses.jsonl

Only the (prompt, setting) pairs both runs answered are compared; a setting's figures are ``summarize``'s
(the medians and means the results page reports) over those shared prompts, first run → second run.
With one run, each setting is compared with that run's own unguided answers: how many answers guidance
(or the prompt) left word for word as they were.

    python benchmarks/compare_runs.py docs/results_responses.jsonl
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from cliper_integrations.evaluation.steering import Job, read_store, summarize

SHOWN = ("words", "fk_grade", "vader", "distinct2", "perplexity", "refusals")
UNGUIDED = Job((), "unguided", 0.0).key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path, nargs="?", help="omitted: compare with the first run's unguided answers")
    args = parser.parse_args()
    runs = [{(r["prompt_id"], r["job"]): r for r in read_store(path)[1]} for path in (args.first, args.second) if path]
    by_job: dict[str, list[tuple[dict, dict]]] = defaultdict(list)
    if len(runs) == 1:
        for (prompt_id, job), record in runs[0].items():
            if (unguided := runs[0].get((prompt_id, UNGUIDED))) is not None and job != UNGUIDED:
                by_job[job].append((unguided, record))
    else:
        for key in runs[0].keys() & runs[1].keys():
            by_job[key[1]].append((runs[0][key], runs[1][key]))
    print(f"| setting | prompts | same answer | {' | '.join(SHOWN)} |\n| --- |{' --- |' * (len(SHOWN) + 2)}")
    for job, pairs in sorted(by_job.items()):
        same = sum(a["response"] == b["response"] for a, b in pairs)
        first, second = (summarize([pair[side] for pair in pairs]) for side in (0, 1))
        moved = " | ".join(f"{first[name]:.2f} → {second[name]:.2f}" for name in SHOWN)
        print(f"| {job} | {len(pairs)} | {same / len(pairs):.0%} | {moved} |")


if __name__ == "__main__":
    main()
