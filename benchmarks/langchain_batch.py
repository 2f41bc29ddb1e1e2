"""What LangChain's ``batch`` and ``abatch`` get from the engine's batching: the same requests through
``ChatCLIPer.batch`` (with the engine's batch window, and without: ``batch_window=None``), ``ChatCLIPer.abatch``,
``invoke`` in executor threads gathered by asyncio (how ``abatch`` reached the engine before ``agenerate`` awaited the
batcher), ``CLIPerLLM.generate`` (LangChain's text-completion class; what its ``batch`` calls) and the engine's own
``generate_batch``, in turn on one loaded model (the adapters' engines share it), ``--repeats`` times; medians of new
tokens over the wall clock.

``ChatCLIPer.batch`` is LangChain's default for chat models: each input goes through its own ``invoke`` in a
thread pool, whose calls the engine's ``RequestBatcher`` gathers into one batch. ``abatch`` gathers ``ainvoke``
coroutines, which await the batcher without a thread each. ``BaseLLM.batch`` hands the whole list to
``_generate``, which calls ``generate_batch`` once.

    python benchmarks/langchain_batch.py --requests 8 --repeats 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from cliper_integrations.core.engine import GenerationRequest
from cliper_integrations.evaluation.bench import BENCH_PROMPTS
from cliper_integrations.langchain import ChatCLIPer, CLIPerLLM

WEIGHTS = {"concise": 4.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    prompts = [BENCH_PROMPTS[i % len(BENCH_PROMPTS)] for i in range(args.requests)]
    chat = ChatCLIPer(max_tokens=args.max_new_tokens, weights=WEIGHTS)
    unbatched = ChatCLIPer(max_tokens=args.max_new_tokens, weights=WEIGHTS, batch_window=None)
    llm = CLIPerLLM(max_tokens=args.max_new_tokens, weights=WEIGHTS)
    engine = chat.engine  # the engine both adapters share
    requests = [GenerationRequest(prompt, weights=WEIGHTS, max_new_tokens=args.max_new_tokens) for prompt in prompts]
    chat.invoke(prompts[0], max_tokens=4)  # loads the model and warms it up

    def chat_batch(model: ChatCLIPer) -> int:
        return sum(message.usage_metadata["output_tokens"] for message in model.batch(prompts))

    def chat_abatch() -> int:
        return sum(message.usage_metadata["output_tokens"] for message in asyncio.run(chat.abatch(prompts)))

    def invokes_in_executor_threads() -> int:
        async def gathered() -> list:
            return await asyncio.gather(*(asyncio.to_thread(chat.invoke, prompt) for prompt in prompts))

        return sum(message.usage_metadata["output_tokens"] for message in asyncio.run(gathered()))

    def llm_batch() -> int:  # what ``BaseLLM.batch`` calls: one ``generate`` over the list
        return llm.generate(prompts).llm_output["token_usage"]["output_tokens"]

    def engine_batch() -> int:
        return sum(result.completion_tokens for result in engine.generate_batch(requests))

    runs = {
        "ChatCLIPer.batch": lambda: chat_batch(chat),
        "ChatCLIPer.batch, batch_window=None": lambda: chat_batch(unbatched),
        "ChatCLIPer.abatch": chat_abatch,
        "invoke in executor threads, gathered": invokes_in_executor_threads,
        "CLIPerLLM.generate": llm_batch,
        "generate_batch": engine_batch,
    }
    speeds: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            tokens = run()
            speeds.setdefault(name, []).append(tokens / (time.perf_counter() - started))
    medians = {name: round(statistics.median(values), 2) for name, values in speeds.items()}
    print(json.dumps({"requests": args.requests, "tok_s": medians, "runs": speeds}))


if __name__ == "__main__":
    main()
