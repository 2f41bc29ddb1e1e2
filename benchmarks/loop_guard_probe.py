"""``steering_probe.py`` under a loop guard that spares the base model's own favourite token.

The engine's guard bans, on guided rows, every token that would repeat an n-gram of the generated text,
the base model's favourite included, so a guided row can never repeat itself where the unguided model
would. Here the favourite is spared (``--favourite-ngram none``) or banned only when it would repeat a
longer n-gram (``--favourite-ngram 8``); every other token is banned as the engine bans it. The rule
applies to every guided row, in place of the classifier's per-class rule (``unprompted_favourite_ngrams``,
``prompted_favourite_ngrams``: since session 40 both variants are the engine's option). A probe of a
decoding rule, not the rule: nothing here changes what the engine or ``cliper eval`` do.

    python benchmarks/loop_guard_probe.py --favourite-ngram none default --all-kinds --prompts 24 \
        --max-new-tokens 160 --classes friendly,expert --alphas 8,16
"""

from __future__ import annotations

import argparse
import sys

import steering_probe

import cliper_integrations.core.engine as engine_module
from cliper_integrations.core.logits_processor import ClassifierGuidedLogitsProcessor


def favourite_sparing_guard(favourite_ngram: int | None) -> type[ClassifierGuidedLogitsProcessor]:
    """The engine's processor with the base model's favourite held, on every row, to ``favourite_ngram``
    (None: always exempt) in place of the classifier's per-class rule."""

    class FavouriteSparingGuard(ClassifierGuidedLogitsProcessor):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **{**kwargs, "favourite_ngrams": None})
            self.favourite_ngrams = [favourite_ngram] * self.weights.shape[0]

    return FavouriteSparingGuard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument(
        "--favourite-ngram",
        type=steering_probe.none_or(int),
        required=True,
        help="'none' (always spared) or the n of its own guard",
    )
    args, rest = parser.parse_known_args()
    engine_module.ClassifierGuidedLogitsProcessor = favourite_sparing_guard(args.favourite_ngram)
    sys.argv = [sys.argv[0], *rest]
    steering_probe.main()


if __name__ == "__main__":
    main()
