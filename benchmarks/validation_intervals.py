"""How far a classifier's validation reading could be from the target by chance: a Wilson interval per axis.

``cliper train`` writes each axis's response-level accuracy and how many validation answers it was read on
(``metrics.json``); this turns them back into counts and prints a 95 % Wilson score interval for each
(scipy's ``binomtest``). The answers are treated as independent draws, though the two poles of an axis are
answers to the same instructions, so the interval is if anything too narrow.

    python benchmarks/validation_intervals.py                      # the classifier shipped for the embedded model
    python benchmarks/validation_intervals.py runs/some-classifier
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scipy.stats import binomtest

PACKAGED = Path(__file__).parents[1] / "cliper_integrations" / "classifiers" / "Qwen2.5-Coder-0.5B-Instruct"
TARGET = 0.85


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("classifier", nargs="?", type=Path, default=PACKAGED, help="a folder with metrics.json")
    parser.add_argument("--confidence", type=float, default=0.95)
    args = parser.parse_args()
    axes = json.loads((args.classifier / "metrics.json").read_text())["validation"]["axes"]
    print(f"axis: read right / answers, accuracy, {args.confidence:.0%} Wilson interval, target {TARGET}")
    for axis, figures in axes.items():
        answers = figures["responses"]
        right = round(figures["response_accuracy"] * answers)
        interval = binomtest(right, answers).proportion_ci(confidence_level=args.confidence, method="wilson")
        held = "holds" if interval.low <= TARGET <= interval.high else "does not hold"
        print(
            f"{axis}: {right} / {answers}, {right / answers:.2f}, [{interval.low:.2f}, {interval.high:.2f}] "
            f"({held} the target)"
        )


if __name__ == "__main__":
    main()
