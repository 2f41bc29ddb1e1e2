"""How often the base model offers a sentiment word among its top candidates, along its own answers.

Guidance only reorders the base model's top-k candidates at each step, so a tone target measured by
VADER can only move as far as VADER's words are among them. This reads the embedded model's greedy
answers to training-side prompts (never the evaluation sets), without a request and with one class's
request in the prompt, and counts at each step whether a word of VADER's lexicon with valence ≤ −1 or
≥ +1 is among the top-k, the probability those words carry, and how many the answer itself used.

    python benchmarks/tone_candidates.py --prompts 24 --request unfriendly
"""

from __future__ import annotations

import argparse

import torch
from steering_probe import probe_prompts
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from cliper_integrations.core.engine import CLIPerEngine
from cliper_integrations.core.prompting import render_chat, with_preference_request


def sentiment_tokens(tokenizer, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks [size] of the tokens that are, stripped and lower-cased, a VADER word of valence ≤ −1 / ≥ +1."""
    lexicon = SentimentIntensityAnalyzer().lexicon
    negative, positive = torch.zeros(size, dtype=torch.bool), torch.zeros(size, dtype=torch.bool)
    for token_id in range(min(len(tokenizer), size)):
        word = tokenizer.decode([token_id]).strip().lower()
        if len(word) > 2 and word in lexicon:
            negative[token_id], positive[token_id] = lexicon[word] <= -1.0, lexicon[word] >= 1.0
    return negative, positive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--request", default="unfriendly", help="the class whose request the second run adds")
    args = parser.parse_args()

    engine = CLIPerEngine("embedded", classifier="none")
    tokenizer, model = engine.tokenizer, engine.loaded.model
    negative, positive = sentiment_tokens(tokenizer, model.get_output_embeddings().weight.shape[0])
    prompts = probe_prompts(args.prompts)
    for setting, weights in (("no request", {}), (f"{args.request} request in the prompt", {args.request: 1.0})):
        counts = dict.fromkeys(("steps", "negative_steps", "positive_steps", "negative_used", "positive_used"), 0)
        mass = {"negative": 0.0, "positive": 0.0}
        for prompt in prompts:
            text = render_chat(tokenizer, with_preference_request([{"role": "user", "content": prompt}], weights))
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
                probs = model(out).logits[0, ids.shape[1] - 1 : -1].softmax(-1)
            top = probs.topk(args.candidates, -1)
            answer = out[0, ids.shape[1] :]
            counts["steps"] += len(answer)
            for name, mask in (("negative", negative), ("positive", positive)):
                offered = mask[top.indices]
                counts[f"{name}_steps"] += int(offered.any(-1).sum())
                counts[f"{name}_used"] += int(mask[answer].sum())
                mass[name] += float((top.values * offered).sum())
        steps = counts["steps"]
        print(
            f"{setting}: {steps} steps; a negative word among the top {args.candidates} at "
            f"{counts['negative_steps'] / steps:.1%} of steps (mean probability {mass['negative'] / steps:.4f}), "
            f"a positive one at {counts['positive_steps'] / steps:.1%} ({mass['positive'] / steps:.4f}); "
            f"the answers used {counts['negative_used']} negative and {counts['positive_used']} positive"
        )


if __name__ == "__main__":
    main()
