"""Why the engine keeps torch work on as few threads as it can: one forward step of the embedded model over
``--rows`` one-token rows, timed where it runs.

- ``main``: on the main thread, which also loaded the model;
- ``second``: on a new thread, after the main thread loaded the model and ran the step (two OpenMP pools);
- ``lone``: on a non-main thread that also loaded the model, the main thread never running torch (one pool).

Each way runs in a process of its own, ``--repeats`` times; the median milliseconds per step.

    python benchmarks/thread_pools.py --rows 4 --steps 30 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
WAYS = ("main", "second", "lone")


def step_ms(rows: int, steps: int, loaded=None) -> float:
    """Milliseconds per forward step over ``rows`` one-token rows, on the calling thread."""
    import torch

    from cliper_integrations.core.models import load_model

    model = (loaded or load_model("embedded")).model
    ids = torch.randint(0, 1000, (rows, 1))
    with torch.inference_mode():
        model(ids)  # warm-up
        started = time.perf_counter()
        for _ in range(steps):
            model(ids)
    return (time.perf_counter() - started) / steps * 1e3


def on_new_thread(call: Callable[[], T]) -> T:
    """``call()``, computed on a thread started for it."""
    out: list[T] = []
    thread = threading.Thread(target=lambda: out.append(call()))
    thread.start()
    thread.join()
    return out[0]


def measure(way: str, rows: int, steps: int) -> float:
    if way == "lone":
        return on_new_thread(lambda: step_ms(rows, steps))
    from cliper_integrations.core.models import load_model

    loaded = load_model("embedded")
    main = step_ms(rows, steps, loaded)
    return main if way == "main" else on_new_thread(lambda: step_ms(rows, steps, loaded))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--way", choices=WAYS, help="time one way in this process (what the others run)")
    args = parser.parse_args()
    if args.way:
        print(measure(args.way, args.rows, args.steps))
        return
    times: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for way in WAYS:
            command = [sys.executable, __file__, "--way", way, "--rows", str(args.rows), "--steps", str(args.steps)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            times.setdefault(way, []).append(float(output.split()[-1]))
    medians = {way: round(statistics.median(values), 1) for way, values in times.items()}
    print(json.dumps({"rows": args.rows, "ms_per_step": medians, "runs": times}))


if __name__ == "__main__":
    main()
