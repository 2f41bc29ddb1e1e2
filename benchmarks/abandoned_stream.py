"""What a stream its reader left costs the next request: one guided request's tokens/s, timed three ways on one
loaded model (the embedded default, its packaged classifier), interleaved, ``--repeats`` times, medians:

- ``alone``: nothing else running;
- ``beside an unread stream``: a long stream was started and its first delta read, then left open and unread, so
  its thread decodes on beside the request. That is what every stream whose reader stopped early did until the
  engine closed such streams (session 65);
- ``after a closed stream``: the same stream, closed right after its first delta (a ``break``), as a chat UI's stop
  button does; the request starts at once, without waiting for the stream's thread.

``stream_outlasted`` says, per way and run, whether the stream's thread was still decoding when the request ended
(only then does ``beside an unread stream`` time the two side by side for the whole request).

    python benchmarks/abandoned_stream.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Iterator

from cliper_integrations.core.engine import STREAM_THREAD, CLIPerEngine
from cliper_integrations.evaluation.bench import batch_of_eight, timed_batch

LONG_PROMPT = "Write a detailed history of the Roman Empire, from its founding to its fall."


def stream_running() -> bool:
    return any(thread.name == STREAM_THREAD and thread.is_alive() for thread in threading.enumerate())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--stream-tokens", type=int, default=512)
    args = parser.parse_args()
    engine = CLIPerEngine("embedded", classifier="default")
    request = batch_of_eight(args.max_new_tokens)[0]
    engine.generate(request, max_new_tokens=8)  # warm-up

    def started_stream() -> Iterator[str]:
        deltas = iter(engine.stream(LONG_PROMPT, weights={"informative": 1}, max_new_tokens=args.stream_tokens))
        next(deltas)
        return deltas

    speeds: dict[str, list[float]] = {}
    outlasted: dict[str, list[bool]] = {}
    for _ in range(args.repeats):
        for way in ("alone", "beside an unread stream", "after a closed stream"):
            deltas = None if way == "alone" else started_stream()
            if way == "after a closed stream":
                deltas.close()
            speed, _ = timed_batch(engine, [request], CLIPerEngine.generate_batch)
            speeds.setdefault(way, []).append(speed)
            outlasted.setdefault(way, []).append(stream_running())
            if deltas is not None:
                deltas.close()
            while stream_running():  # the next way starts with nothing decoding
                time.sleep(0.05)
    medians = {way: round(statistics.median(values), 2) for way, values in speeds.items()}
    ratios = {way: round(medians[way] / medians["alone"], 3) for way in medians}
    print(json.dumps({"tok_s": medians, "ratio_to_alone": ratios, "stream_outlasted": outlasted, "runs": speeds}))


if __name__ == "__main__":
    main()
