"""``steering_probe.py`` under a loop guard that spares the base model's own favourite token.

The engine's guard bans, on guided rows, every token that would repeat an n-gram of the generated text,
the base model's favourite included, so a guided row can never repeat itself where the unguided model
would. Here the favourite is spared (``--favourite-ngram none``) or banned only when it would repeat a
longer n-gram (``--favourite-ngram 8``); every other token is banned as the engine bans it. The rule
applies to every guided row, in place of the classifier's ``favourite_sparing_classes`` (since session
39 the engine's option; ``none`` is that option). A probe of a decoding rule, not the rule: nothing
here changes what the engine or ``cliper eval`` do.

    python benchmarks/loop_guard_probe.py --favourite-ngram none default --all-kinds --prompts 24 \
        --max-new-tokens 160 --classes friendly,expert --alphas 8,16
"""

from __future__ import annotations

import argparse
import sys

import steering_probe
import torch

import cliper_integrations.core.engine as engine_module
from cliper_integrations.core.logits_processor import ClassifierGuidedLogitsProcessor


def favourite_sparing_guard(favourite_ngram: int | None) -> type[ClassifierGuidedLogitsProcessor]:
    """The engine's processor with the base model's favourite exempt from the guard, up to repeats of
    ``favourite_ngram`` tokens (None: always exempt)."""

    class FavouriteSparingGuard(ClassifierGuidedLogitsProcessor):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self.spare_favourite = None  # this script's rule, not the classifier's setting, on every row

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            self._favourite = scores.argmax(dim=-1)
            return super().__call__(input_ids, scores)

        def _repeats(self, input_ids: torch.Tensor, active: torch.Tensor, vocab_size: int) -> torch.Tensor:
            banned = super()._repeats(input_ids, active, vocab_size)
            rows = torch.arange(banned.shape[0], device=banned.device)
            favourite = self._favourite.to(banned.device)
            if favourite_ngram is None:
                banned[rows, favourite] = False
                return banned
            n, self.no_repeat_ngram = self.no_repeat_ngram, favourite_ngram
            long_repeats = super()._repeats(input_ids, active, vocab_size)
            self.no_repeat_ngram = n
            banned[rows, favourite] = long_repeats[rows, favourite]
            return banned

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
