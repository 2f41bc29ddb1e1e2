"""Where the base model ends an answer, could guidance towards a class keep it going?

Guidance reorders the base model's candidates by α · log p_cls(c | prefix, x), so at the step where the
base model ends its (unguided, greedy) answer, a class lengthens the answer only if its margin against
ending, log p_cls(c | prefix, best other token) − log p_cls(c | prefix, end of turn), times α, outweighs
how much likelier the base model finds ending, and only if the plausibility floor lets the other token
through at all. This reads the unguided answers of ``steering_probe.py`` (training-side instructions,
never the evaluation sets; answered and cached as there) and prints, over the answers that ended before
their token budget, the base model's probability of ending, the best other token's probability relative
to it, the class's margins, and how many would still end at α without a floor and under the engine's.

    python benchmarks/ending_margin.py default --all-kinds --prompts 24 --max-new-tokens 160 --classes informative
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from steering_probe import answered, probe_instructions, unguided_cache

from cliper_integrations.core.engine import CLIPerEngine
from cliper_integrations.core.prompting import render_chat
from cliper_integrations.evaluation.steering import EvalConfig, Job


def ending_steps(engine: CLIPerEngine, prompts: list[tuple[int, str]], max_new_tokens: int) -> list[torch.Tensor]:
    """Token ids of prompt plus answer, for each cached unguided answer that ended before its budget."""
    config = EvalConfig(Path("unused"), max_new_tokens=max_new_tokens, batch_size=8)
    records = answered(engine, Job((), "unguided", 0.0), prompts, config, unguided_cache(engine, max_new_tokens))
    texts = dict(prompts)
    return [
        engine.tokenizer(
            render_chat(engine.tokenizer, [{"role": "user", "content": texts[record["prompt_id"]]}])
            + record["response"],
            return_tensors="pt",
            add_special_tokens=False,
        )["input_ids"]
        for record in records
        if record["finish_reason"] == "stop"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("classifier", help="a classifier folder, or 'default'")
    parser.add_argument("--classes", default="informative", help="comma-separated classes")
    parser.add_argument("--alpha", type=float, default=8.0)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--all-kinds", action="store_true", help="every kind of instruction, not only open questions")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--candidates", type=int, default=32)
    args = parser.parse_args()

    engine = CLIPerEngine("embedded", classifier=args.classifier)
    classifier, floor = engine.classifier, engine.guided_plausibility
    ends = torch.tensor(engine.eos_token_ids)
    prompts = probe_instructions(args.prompts, all_kinds=args.all_kinds)
    steps = ending_steps(engine, prompts, args.max_new_tokens)
    rows = []
    with torch.inference_mode():
        for ids in steps:
            hidden = engine.loaded.model.base_model(input_ids=ids).last_hidden_state[:, -1].float()
            log_lm = classifier.base_log_probs(hidden)
            candidates = torch.cat([log_lm.topk(args.candidates, -1).indices[0], ends]).unique().unsqueeze(0)
            candidate_lm = log_lm.gather(-1, candidates)
            rows.append((candidates[0], candidate_lm[0], classifier.log_probs(hidden, candidates, candidate_lm)[0]))
    print(f"{len(steps)} of {len(prompts)} answers ended before {args.max_new_tokens} tokens (unguided, greedy)")
    for name in args.classes.split(","):
        column = classifier.classes.index(name)
        margins, ratios, p_end, still_end, still_end_floor = [], [], [], 0, 0
        for candidates, log_lm, log_cls in rows:
            is_end = torch.isin(candidates, ends)
            end = int(log_lm.masked_fill(~is_end, float("-inf")).argmax())
            other = int(log_lm.masked_fill(is_end, float("-inf")).argmax())
            margins.append(float(log_cls[other, column] - log_cls[end, column]))
            ratios.append(float((log_lm[other] - log_lm[end]).exp()))
            p_end.append(float(log_lm[end].exp()))
            guided = log_lm + args.alpha * log_cls[:, column]
            still_end += bool(is_end[guided.argmax()])
            if floor is not None:  # end-of-turn tokens are exempt from the floor, as in decoding
                allowed = is_end | (log_lm >= log_lm.max() + torch.log(torch.tensor(floor)))
                guided = guided.masked_fill(~allowed, float("-inf"))
            still_end_floor += bool(is_end[guided.argmax()])
        print(
            f"{name}: p(end) median {statistics.median(p_end):.3f}; best other "
            f"token / p(end) median {statistics.median(ratios):.3f}; margin against ending (nats) median "
            f"{statistics.median(margins):+.2f}, range {min(margins):+.2f} to {max(margins):+.2f}; at α = "
            f"{args.alpha:g} still ending: {still_end} of {len(rows)} without a floor, {still_end_floor} under "
            f"the engine's ({floor}), which leaves no other token at {sum(r < (floor or 0) for r in ratios)}"
        )


if __name__ == "__main__":
    main()
