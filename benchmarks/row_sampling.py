"""What drawing each row's token in ``RowSamplingLogitsProcessor`` costs against transformers' own sampling: the
embedded model, unguided, ``--rows`` copies of the bench's prompts sampled at temperature 0.7 and top-p 0.9, for
``--max-new-tokens`` tokens (no end: every row runs to the cap), each way in turn, ``--repeats`` times; medians of
new tokens per second.

- ``transformers``: ``generate(do_sample=True, temperature=0.7, top_p=0.9, top_k=0)``, one setting for the batch;
- ``per row``: ``generate(do_sample=False)`` with ``RowSamplingLogitsProcessor``, what the engine runs since
  session 57 (a sort of the vocabulary per sampled row and step, as transformers' top-p does for the batch).

    python benchmarks/row_sampling.py --rows 1,8 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from cliper_integrations.core.engine import left_padded
from cliper_integrations.core.models import load_model
from cliper_integrations.core.prompting import question_ids
from cliper_integrations.core.sampling import RowSamplingLogitsProcessor
from cliper_integrations.evaluation.bench import BENCH_PROMPTS

TEMPERATURE, TOP_P = 0.7, 0.9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8", help="batch sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    loaded = load_model("embedded")

    def tokens_per_second(rows: int, per_row: bool) -> float:
        prompts = [BENCH_PROMPTS[i % len(BENCH_PROMPTS)] for i in range(rows)]
        ids, mask = left_padded([question_ids(loaded.tokenizer, prompt) for prompt in prompts], 0)
        if per_row:
            sampler = RowSamplingLogitsProcessor([TEMPERATURE] * rows, [TOP_P] * rows, [None] * rows)
            options = {"do_sample": False, "logits_processor": [sampler]}
        else:
            options = {"do_sample": True, "temperature": TEMPERATURE, "top_p": TOP_P, "top_k": 0}
        started = time.perf_counter()
        with torch.inference_mode():
            output = loaded.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=args.max_new_tokens,
                min_new_tokens=args.max_new_tokens,
                pad_token_id=0,
                **options,
            )
        return (output.shape[0] * (output.shape[1] - ids.shape[1])) / (time.perf_counter() - started)

    tokens_per_second(1, True)  # warm-up
    speeds: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for rows in map(int, args.rows.split(",")):
            for per_row in (False, True):
                name = f"{rows} rows, {'per row' if per_row else 'transformers'}"
                speeds.setdefault(name, []).append(tokens_per_second(rows, per_row))
    medians = {name: round(statistics.median(values), 2) for name, values in speeds.items()}
    print(json.dumps({"tok_s": medians, "runs": speeds}))


if __name__ == "__main__":
    main()
