"""Which of a classifier's guidance is another's: ``guidance_digest`` compared set by set.

Two classifiers with one digest for a set of classes, in one setting (guidance alone, or with the
request also in the prompt), steer those requests alike, and ``cliper eval --reuse-from`` takes such
answers from one's store for the other. This checks a composed classifier's claim before any answer is
made (session 45: XTm's digests are v16's for every set without expert, and XT's for every set with
expert and without elementary). Every set of one to three classes a user may ask for is compared, in
both settings; each row names the references that share the classifier's digest there.

    python benchmarks/guidance_digests.py default --like /tmp/v16

(``/tmp/v16``: the packaged v16's three files from commit 9808dd4, as in session 46.)
"""

from __future__ import annotations

import argparse
import itertools
from collections import Counter

from cliper_integrations.core.classifier import PreferenceClassifier
from cliper_integrations.core.engine import CLIPerEngine
from cliper_integrations.core.preferences import DEFAULT_CLASSES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("classifier", help="classifier folder, or 'default'")
    parser.add_argument("--like", action="append", required=True, help="a reference classifier (repeatable)")
    parser.add_argument("--largest", type=int, default=3, help="largest set of classes compared")
    args = parser.parse_args()
    engine = CLIPerEngine("embedded", classifier=args.classifier)
    references = {
        spec: engine.classifier if spec == args.classifier else PreferenceClassifier.load(spec, engine.loaded)
        for spec in args.like
    }
    tally: Counter[str] = Counter()
    print("| classes | setting | same digest as |\n| --- | --- | --- |")
    for size in range(1, args.largest + 1):
        for classes in itertools.combinations(DEFAULT_CLASSES, size):
            for prompted in (False, True):
                own = engine.classifier.guidance_digest(classes, prompted)
                same = [spec for spec, ref in references.items() if ref.guidance_digest(classes, prompted) == own]
                shared = ", ".join(same) or "none (new guidance)"
                tally[shared] += 1
                print(f"| {' + '.join(classes)} | {'prompt' if prompted else 'alone'} | {shared} |")
    print("\n" + "\n".join(f"{count} sets × settings: {shared}" for shared, count in tally.most_common()))


if __name__ == "__main__":
    main()
