"""Counts for the data card (docs/data.md) of some rows of a ``cliper data generate`` file: per class, the
responses, refusals, loops, echoes, answers at the token cap and mean new tokens, judged as the trainer
judges them (``judge_row``); then, per axis, how many of the instructions these rows answer keep a pair of
pole answers under the trainer's contrast filter (over every row of those instructions in the file, so
earlier samples count), and the mean measure of the kept answers of each pole.

    python benchmarks/data_card.py data/train_generations.jsonl --rows 5840:
    python benchmarks/data_card.py data/train_generations.jsonl --rows 5840: --pole-limit unfriendly=0
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from cliper_integrations.core.preferences import AXES, DEFAULT_CLASSES, REFUSAL, axis_of
from cliper_integrations.training.data import CONTRAST_RULES, keep_contrasting, parse_pole_limit, read_jsonl
from cliper_integrations.training.trainer import judge_row

COLUMNS = ("responses", "trained as refusal", "loops", "echoes", "at the cap")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--rows", default=":", help="START:END, a slice of the file's rows (default: all)")
    parser.add_argument("--pole-limit", action="append", default=[], help="CLASS=BOUND, as cliper train's")
    args = parser.parse_args()
    start, _, end = args.rows.partition(":")
    every = list(read_jsonl(args.file))
    rows = slice(int(start or 0), int(end) if end else None)
    chosen = every[rows]
    judged = [judge_row(row, (*DEFAULT_CLASSES, REFUSAL)) for row in every]  # once per row: both tables read it
    limits = dict(parse_pole_limit(spec) for spec in args.pole_limit)

    counts: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(COLUMNS, 0))
    tokens: dict[str, list[int]] = defaultdict(list)
    for row, (kept, reason) in zip(chosen, judged[rows], strict=True):
        line = counts[row["class"]]
        line["responses"] += 1
        line["trained as refusal"] += kept is not None and kept["class"] == REFUSAL
        line["loops"] += reason == "degenerate"
        line["echoes"] += reason == "echoes"
        line["at the cap"] += bool(row.get("truncated"))
        tokens[row["class"]].append(row.get("new_tokens", 0))
    print(f"{len(chosen)} rows, {len({row['id'] for row in chosen})} instructions\n")
    print(f"| class | {' | '.join(COLUMNS)} | mean new tokens |\n| --- |{' --- |' * (len(COLUMNS) + 1)}")
    for name, line in counts.items():
        print(f"| {name} | {' | '.join(str(int(line[c])) for c in COLUMNS)} | {statistics.mean(tokens[name]):.0f} |")

    ids = {row["id"] for row in chosen}
    usable = [kept for row, (kept, _) in zip(every, judged, strict=True) if row["id"] in ids and kept is not None]
    kept_rows, _ = keep_contrasting(usable, limits)
    print("\n| axis | instructions with a kept pair | mean measure of the kept answers |\n| --- | --- | --- |")
    for axis, poles in AXES.items():
        if not (asked := {row["id"] for row in chosen if axis_of(row["class"]) == axis}):
            continue
        measure, _ = CONTRAST_RULES[axis]
        means = []
        for pole in poles:
            values = [measure(row["response"]) for row in kept_rows if row["class"] == pole]
            means.append(f"{pole} {statistics.mean(values):+.2f}" if values else f"{pole} –")
        pairs = len({row["id"] for row in kept_rows if axis_of(row["class"]) == axis})
        print(f"| {axis} | {pairs} of {len(asked)} | {', '.join(means)} |")


if __name__ == "__main__":
    main()
