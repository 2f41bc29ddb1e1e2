"""Which validation answers a classifier reads as the opposite pole of their axis, and what they share.

The reading figures in ``docs/classifier.md`` say how many answers of an axis are misread; this lists
them with the public metrics the contrast filter uses (words, Flesch-Kincaid grade, VADER), the model
that wrote them and how much of the margin the learned class prior gives, so that a gap can be traced
to the data or to the head. Same data, split and filter as ``cliper train`` (features from its cache).

    python benchmarks/reading_errors.py cliper_integrations/classifiers/Qwen2.5-Coder-0.5B-Instruct \\
        --data runs/v6_rows.jsonl --data data/train_generations_smollm2.jsonl --axis tone
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch

from cliper_integrations.core.classifier import PreferenceClassifier
from cliper_integrations.core.models import load_model
from cliper_integrations.core.preferences import AXES
from cliper_integrations.evaluation.metrics import fk_grade, vader_compound, word_count
from cliper_integrations.training.data import keep_contrasting
from cliper_integrations.training.trainer import assemble, encode_rows, load_rows, read_classes, split_by_instruction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("classifier", type=Path)
    parser.add_argument("--data", type=Path, action="append", required=True, help="as given to cliper train")
    parser.add_argument("--axis", choices=sorted(AXES), action="append", help="default: every axis")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--feature-cache", type=Path, default=Path("runs/features"))
    parser.add_argument("--unfiltered", action="store_true", help="every usable answer, not only contrasting ones")
    args = parser.parse_args()

    base = load_model(args.model)
    classifier = PreferenceClassifier.load(args.classifier, base)
    classes = tuple(classifier.classes)
    rows, _ = load_rows(args.data, classes)
    _, validation = split_by_instruction(rows, args.val_fraction, args.seed)
    if not args.unfiltered:
        validation, _ = keep_contrasting(validation)
    features = encode_rows(classifier, base, validation, args.feature_cache, candidates=args.candidates)
    data = assemble(features, validation, classes)
    _, sums = read_classes(classifier, data)
    with torch.no_grad():
        picked = data.select(slice(None))
        log_prior = classifier.reading_log_prior(picked["hidden"], picked.get("prior_hidden"))
    prior_sums = data.sum_per_response(log_prior)
    tokens = data.response_lengths().clamp(min=1)

    for axis in args.axis or sorted(AXES):
        first, second = AXES[axis]
        pair = [classes.index(first), classes.index(second)]
        members = [i for i, row in enumerate(validation) if row["class"] in (first, second)]
        misread = []
        for i in members:
            margin = float(sums[i, pair[0]] - sums[i, pair[1]]) / int(tokens[i])
            if (first if margin >= 0 else second) != validation[i]["class"]:  # a tie reads as the first, as in evaluate
                prior_margin = float(prior_sums[i, pair[0]] - prior_sums[i, pair[1]]) / int(tokens[i])
                misread.append((i, margin, prior_margin))
        print(f"\n## {axis}: {len(members) - len(misread)} of {len(members)} read right\n")
        print("| class | model | words | FK grade | VADER | margin (prior) | opening |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for i, margin, prior_margin in misread:
            row = validation[i]
            text = row["response"]
            opening = text[:90].replace("\n", " ").replace("|", "/")
            print(
                f"| {row['class']} | {row.get('model', '?')} | {word_count(text)} | {fk_grade(text):.1f} | "
                f"{vader_compound(text):+.2f} | {margin:+.2f} ({prior_margin:+.2f}) | {opening} |"
            )
        by_class = Counter(validation[i]["class"] for i, _, _ in misread)
        by_model = Counter(validation[i].get("model", "?") for i, _, _ in misread)
        print(f"\nmisread by class: {dict(by_class)}; by model: {dict(by_model)}")


if __name__ == "__main__":
    main()
