"""How long one decoding step's matrix products take on this CPU, per batch size, two ways.

A decoding step multiplies a few rows (one per request in the batch) by each weight matrix of the model:
``torch.nn.functional.linear(x, W)``, i.e. x @ Wᵀ, is what every ``nn.Linear`` does; (W @ xᵀ)ᵀ gives the same
numbers with the large matrix on the left. This times both for each projection shape of the embedded model
(random weights of the same shapes, float32 or ``--dtype``; no model is loaded) and adds them up to one step's products
(``step``), so that a step's cost at each batch size can be read off without the rest of decoding in the way.

    python benchmarks/linear_shapes.py --batch-sizes 1 2 3 4 7 8 16
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = {  # (out, in, products per step) of Qwen2.5-0.5B's projections: 24 layers, then the output head
    "q_proj, o_proj": (896, 896, 48),
    "k_proj, v_proj": (128, 896, 48),
    "gate_proj, up_proj": (4864, 896, 48),
    "down_proj": (896, 4864, 24),
    "lm_head": (151936, 896, 1),
}


def weight_left(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ Wᵀ computed as (W @ xᵀ)ᵀ."""
    return (weight @ x.T).T


def milliseconds(product, x: torch.Tensor, weight: torch.Tensor, repeats: int) -> float:
    """Median milliseconds of ``product(x, weight)`` over ``repeats`` runs, after two warm-up runs."""
    for _ in range(2):
        product(x, weight)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        product(x, weight)
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 3, 4, 7, 8, 16])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    figures: dict[str, dict[int, dict[str, float]]] = {}
    with torch.inference_mode():
        for name, (rows_out, rows_in, _) in SHAPES.items():
            weight = torch.randn(rows_out, rows_in, dtype=getattr(torch, args.dtype))
            figures[name] = {}
            for batch in args.batch_sizes:
                x = torch.randn(batch, rows_in, dtype=weight.dtype)
                figures[name][batch] = {
                    label: round(milliseconds(product, x, weight, args.repeats), 3)
                    for label, product in (("linear_ms", torch.nn.functional.linear), ("weight_left_ms", weight_left))
                }
    step = {  # all of a step's products, one way or the other
        batch: {
            label: round(sum(count * figures[name][batch][label] for name, (_, _, count) in SHAPES.items()), 1)
            for label in ("linear_ms", "weight_left_ms")
        }
        for batch in args.batch_sizes
    }
    print(json.dumps({"dtype": args.dtype, "torch_threads": torch.get_num_threads(), "step": step, "figures": figures}))


if __name__ == "__main__":
    main()
