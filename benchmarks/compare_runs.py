"""Compare two ``cliper eval`` runs answer by answer: how many greedy answers are the same, and how far
each setting's metrics moved (for example float32 against bfloat16, or one classifier against another).

    python benchmarks/compare_runs.py docs/results_responses.jsonl docs/results_bfloat16/results_responses.jsonl

Only the (prompt, setting) pairs both runs answered are compared; a setting's figures are ``summarize``'s
(the medians and means the results page reports) over those shared prompts, first run → second run.
With one run, each setting is compared with that run's own unguided answers: how many answers guidance
(or the prompt) left word for word as they were, and how many it turned into refusals ("newly declined").
``--without-refusals`` keeps only the prompts where neither answer is a refusal (``is_refusal``): the engine
leaves a prompt unguided where the base model's opening declines, so those answers are the same in every
guided setting and hide how far guidance moves the rest. ``--list-refusals`` prints the unguided answers the
detector flags, with their length: a disclaimer followed by a full answer reads as a refusal too.
``--against-prompt`` compares each prompted, guided setting with prompting alone for the same class instead
of with unguided answers: with ``--without-refusals``, whether guidance moves the answers further than the
request alone where neither declines (the prompt-alone answers keep the request's own refusals, which the
engine answers in guided rows since session 51). ``--split-disclaimers`` (one run) reports each setting twice: on the
prompts whose unguided answer opens with a disclaimer ("As an AI …", ``is_disclaimer``), which the engine guides from
the base model's first 64 tokens since session 53, and on the rest.

    python benchmarks/compare_runs.py docs/results_responses.jsonl
    python benchmarks/compare_runs.py docs/results_responses.jsonl --without-refusals --list-refusals
    python benchmarks/compare_runs.py docs/results_responses.jsonl --against-prompt --without-refusals
    python benchmarks/compare_runs.py docs/results_alpaca_evaluation100/results_responses.jsonl --split-disclaimers
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from cliper_integrations.core.preferences import is_disclaimer
from cliper_integrations.evaluation.steering import Job, read_store, summarize

SHOWN = ("words", "fk_grade", "vader", "distinct2", "perplexity", "refusals", "unfinished")
UNGUIDED = Job((), "unguided", 0.0).key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path, nargs="?", help="omitted: compare with the first run's unguided answers")
    parser.add_argument("--without-refusals", action="store_true", help="only prompts where neither answer declines")
    parser.add_argument("--list-refusals", action="store_true", help="print the unguided answers that read as refusals")
    parser.add_argument("--against-prompt", action="store_true", help="one run: prompt+guidance against prompt alone")
    parser.add_argument(
        "--split-disclaimers", action="store_true", help="one run: prompts whose unguided answer disclaims, the rest"
    )
    args = parser.parse_args()
    runs = [{(r["prompt_id"], r["job"]): r for r in read_store(path)[1]} for path in (args.first, args.second) if path]
    if args.list_refusals:
        for (prompt_id, job), record in sorted(runs[0].items()):
            if job == UNGUIDED and record["refusal"]:
                print(f"prompt {prompt_id}: {record['words']} words, {record['response'][:90]!r}")
    by_job: dict[str, list[tuple[dict, dict]]] = defaultdict(list)
    if len(runs) == 1:
        reference = reference_jobs({job for _, job in runs[0]}, args.against_prompt)
        for (prompt_id, job), record in runs[0].items():
            if job in reference and (before := runs[0].get((prompt_id, reference[job]))) is not None:
                by_job[job + disclaimer_part(runs[0], prompt_id, args.split_disclaimers)].append((before, record))
    else:
        for key in runs[0].keys() & runs[1].keys():
            by_job[key[1]].append((runs[0][key], runs[1][key]))
    header = f"| setting | prompts | same answer | newly declined | {' | '.join(SHOWN)} |"
    print(f"{header}\n| --- |{' --- |' * (len(SHOWN) + 3)}")
    for job, pairs in sorted(by_job.items()):
        newly = sum(b["refusal"] and not a["refusal"] for a, b in pairs)
        if args.without_refusals:
            pairs = [(a, b) for a, b in pairs if not (a["refusal"] or b["refusal"])]
        if not pairs:
            print(f"| {job} | 0 | – | {newly} |{' – |' * len(SHOWN)}")
            continue
        same = sum(a["response"] == b["response"] for a, b in pairs)
        first, second = (summarize([pair[side] for pair in pairs]) for side in (0, 1))
        moved = " | ".join(f"{first[name]:.2f} → {second[name]:.2f}" for name in SHOWN)
        print(f"| {job} | {len(pairs)} | {same / len(pairs):.0%} | {newly} | {moved} |")


def disclaimer_part(run: dict[tuple[int, str], dict], prompt_id: int, split: bool) -> str:
    """With ``split``, which part of the prompts this one's figures go to: does its unguided answer disclaim?"""
    if not split:
        return ""
    return " [disclaimer prompts]" if is_disclaimer(run[prompt_id, UNGUIDED]["response"]) else " [other prompts]"


def reference_jobs(jobs: set[str], against_prompt: bool) -> dict[str, str]:
    """What each job of one run is compared with: its unguided answers, or (``against_prompt``) for a
    prompted, guided job the same classes' prompt-alone job, where the run has one."""
    if not against_prompt:
        return {job: UNGUIDED for job in jobs if job != UNGUIDED}
    parsed = {key: Job.from_key(key) for key in jobs}
    prompt_alone = {job.classes: key for key, job in parsed.items() if job.setting == "prompt"}
    guided = {key: job.classes for key, job in parsed.items() if job.setting == "prompt+guidance"}
    return {key: prompt_alone[classes] for key, classes in guided.items() if classes in prompt_alone}


if __name__ == "__main__":
    main()
