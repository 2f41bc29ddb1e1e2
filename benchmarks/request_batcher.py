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

from thread_pools import on_new_thread

from cliper_integrations.core.engine import CLIPerEngine, GenerationRequest, GenerationResult
from cliper_integrations.evaluation.bench import Answer, batch_of_eight, each_on_a_thread, timed_batch


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

    def batch_on_a_new_thread(engine: CLIPerEngine, batch: list[GenerationRequest]) -> list[GenerationResult]:
        return on_new_thread(lambda: engine.generate_batch(batch))

    def by_generate(engine: CLIPerEngine, batch: list[GenerationRequest]) -> list[GenerationResult]:
        return [engine.generate(request) for request in batch]

    runs: dict[str, tuple[CLIPerEngine, list[GenerationRequest], Answer]] = {
        "lone, batcher": (batched, requests[:1], by_generate),
        "lone, batch_window=None": (alone, requests[:1], by_generate),
        "second thread": (alone, requests[:1], batch_on_a_new_thread),
        f"{args.threads} threads, batcher": (batched, requests, each_on_a_thread),
        f"{args.threads} threads, batch_window=None": (alone, requests, each_on_a_thread),
        f"{args.threads} by generate_batch": (alone, requests, CLIPerEngine.generate_batch),
    }
    speeds: dict[str, list[float]] = {}
    texts: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        for name, (engine, batch, answer) in runs.items():
            speed, results = timed_batch(engine, batch, answer)
            speeds.setdefault(name, []).append(speed)
            texts.setdefault(name, [r.text for r in results])
    medians = {name: round(statistics.median(values), 2) for name, values in speeds.items()}
    threaded = [texts[f"{args.threads} threads, {way}"] for way in ("batcher", "batch_window=None")]
    print(json.dumps({"tok_s": medians, "same_texts_threads": threaded[0] == threaded[1], "runs": speeds}))


if __name__ == "__main__":
    main()
