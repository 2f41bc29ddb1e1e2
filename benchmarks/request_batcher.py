"""What the engine's request batcher gives calls made on threads of their own, and what it costs a lone call.

On one loaded model (the embedded default, its packaged classifier), interleaved, ``--repeats`` times; medians of
new tokens over the wall clock of each run:

- ``lone``: the bench's first guided request by ``generate`` on the main thread, with the batcher (``batch_window``
  10 ms) and without (``batch_window=None``). The batcher answers a lone call on its caller's thread.
- ``second thread``: the same request without the batcher on a new thread, as every stream runs and every call
  from a thread pool. Each thread that runs torch's parallel work gets an OpenMP pool of its own, and a second
  pool beside the main thread's slows the work down.
- ``N threads``: the first N requests of the bench's batch, each by ``generate`` on a thread of its own (as
  LangChain's ``batch`` runs them), with the batcher and without; and the same N by one ``generate_batch`` on the
  main thread (the batcher's batch runs on one of the N threads).

    python benchmarks/request_batcher.py --threads 4 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable

from cliper_integrations.core.engine import CLIPerEngine, GenerationResult
from cliper_integrations.evaluation.bench import batch_of_eight, each_on_a_thread


def on_new_thread(call: Callable[[], list[GenerationResult]]) -> list[GenerationResult]:
    """``call``'s results, computed on a thread started for it."""
    results: list[GenerationResult] = []
    thread = threading.Thread(target=lambda: results.extend(call()))
    thread.start()
    thread.join()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    batched = CLIPerEngine("embedded", classifier="default")
    alone = CLIPerEngine(batched.loaded, classifier=batched.classifier, batch_window=None)
    requests = batch_of_eight(args.max_new_tokens)[: args.threads]
    batched.generate(requests[0], max_new_tokens=8)  # warm-up
    runs: dict[str, Callable[[], list[GenerationResult]]] = {
        "lone, batcher": lambda: [batched.generate(requests[0])],
        "lone, batch_window=None": lambda: [alone.generate(requests[0])],
        "second thread": lambda: on_new_thread(lambda: alone.generate_batch(requests[:1])),
        f"{args.threads} threads, batcher": lambda: each_on_a_thread(batched, requests),
        f"{args.threads} threads, batch_window=None": lambda: each_on_a_thread(alone, requests),
        f"{args.threads} by generate_batch": lambda: alone.generate_batch(requests),
    }
    speeds: dict[str, list[float]] = {}
    texts: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            results = run()
            speeds.setdefault(name, []).append(
                sum(r.completion_tokens for r in results) / (time.perf_counter() - started)
            )
            texts.setdefault(name, [r.text for r in results])
    medians = {name: round(statistics.median(values), 2) for name, values in speeds.items()}
    threaded = [texts[f"{args.threads} threads, {way}"] for way in ("batcher", "batch_window=None")]
    print(json.dumps({"tok_s": medians, "same_texts_threads": threaded[0] == threaded[1], "runs": speeds}))


if __name__ == "__main__":
    main()
