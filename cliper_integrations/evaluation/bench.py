"""Decoding speed: unguided vs guided tokens/s, the gain from batching rows with different weights, and how
soon a stream shows its first text."""

from __future__ import annotations

import copy
import platform
import resource
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace

import torch

from cliper_integrations.core.classifier import PreferenceClassifier
from cliper_integrations.core.engine import DISCLAIMER_WARNING, CLIPerEngine, GenerationRequest, GenerationResult
from cliper_integrations.core.preferences import DEFAULT_CLASSES

BENCH_PROMPTS = [
    "Explain why the sky is blue.",
    "Give three tips for staying healthy.",
    "Describe how a bill becomes a law.",
    "What is the difference between weather and climate?",
]
DISCLAIMER_PROMPT = "Compare the dietary needs of cats and dogs."
"""A training-side instruction (``benchmarks/disclaimer_probe.py``) the embedded model answers, greedy, with "As an AI
language model, I don't have personal preferences …" and then 135 words: the engine drafts it to
``disclaimer_lookahead`` tokens before a guided answer starts."""
WEIGHT_SETS = [
    {"concise": 4.0},
    {"informative": 4.0},
    {"elementary": 3.0},
    {"expert": 3.0},
    {"friendly": 3.0},
    {"unfriendly": 3.0},
    {"concise": 2.0, "friendly": 2.0},
    {"expert": 2.0, "informative": 2.0},
]


@dataclass
class BenchResult:
    model: str
    classifier: str
    unguided_tok_s: float
    guided_tok_s: float
    ratio: float
    refusal_lookahead: int | None
    guided_without_lookahead_tok_s: float
    lookahead_ratio: float
    """Guided tokens/s with the engine's refusal look-ahead over guided tokens/s without it."""
    single_guided_tok_s: float
    unguided_first_text_s: float
    guided_first_text_s: float
    """Seconds from asking for a stream to its first text; a guided stream holds back the opening the
    engine checks for refusals (``refusal_lookahead`` tokens)."""
    disclaimer_lookahead: int | None
    disclaimer_guided: bool
    """Whether the engine took ``DISCLAIMER_PROMPT``'s opening for a disclaimer and guided the answer from its
    draft (on another model the prompt may open otherwise, and the two figures below time an ordinary prompt)."""
    disclaimer_unguided_first_text_s: float
    disclaimer_guided_first_text_s: float
    batch8_tok_s: float
    batch8_speedup: float
    batch8_disclaimer_tok_s: float
    """Aggregate tokens/s of the batch of 8 with ``DISCLAIMER_PROMPT`` in one row (``batch_of_eight``)."""
    threads4_tok_s: float
    """Aggregate tokens/s of the batch's first 4 requests, each asked by ``generate`` on a thread of its own
    (``each_on_a_thread``), which the engine's request batcher answers together."""
    peak_rss_mb: float
    max_new_tokens: int
    repeats: int
    torch_threads: int
    machine: str

    def as_dict(self) -> dict:
        return asdict(self)


Answer = Callable[[CLIPerEngine, list[GenerationRequest]], list[GenerationResult]]

STREAM_TOKENS = 16
"""Tokens per timed stream: enough to pass a guided stream's held-back opening."""


def _first_text_seconds(engine: CLIPerEngine, request: GenerationRequest) -> tuple[float, GenerationResult]:
    """Seconds until the stream's first text, and its result; the stream is read to its end so that no
    generation is still running when the next measurement starts."""
    started = time.perf_counter()
    first = None
    stream = engine.stream(request)
    for _ in stream:
        first = first if first is not None else time.perf_counter() - started
    assert stream.result is not None
    return (first if first is not None else time.perf_counter() - started), stream.result


def batch_of_eight(
    max_new_tokens: int, guided: bool = True, disclaimer_tokens: int | None = None
) -> list[GenerationRequest]:
    """The bench's batch: one request per weight set (none when not ``guided``), over the prompts in turn; with
    ``disclaimer_tokens``, the second asks ``DISCLAIMER_PROMPT`` for that many, a row the engine drafts past its
    disclaimer and then guides, beside seven it guides from the start."""
    batch = [
        GenerationRequest(
            BENCH_PROMPTS[i % len(BENCH_PROMPTS)], weights=w if guided else None, max_new_tokens=max_new_tokens
        )
        for i, w in enumerate(WEIGHT_SETS)
    ]
    if disclaimer_tokens is not None:
        batch[1] = replace(batch[1], prompt=DISCLAIMER_PROMPT, max_new_tokens=disclaimer_tokens)
    return batch


def each_on_a_thread(engine: CLIPerEngine, requests: list[GenerationRequest]) -> list[GenerationResult]:
    """``generate`` for each request on a thread of its own, all started together, as LangChain's ``batch`` asks."""
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return list(pool.map(engine.generate, requests))


def timed_batch(
    engine: CLIPerEngine, requests: list[GenerationRequest], answer: Answer = CLIPerEngine.generate_batch
) -> tuple[float, list[GenerationResult]]:
    """The requests' results, and their new tokens over the wall-clock seconds of the one call that answers
    them: a row's own ``seconds`` would leave out the rows the engine answers in other ``generate`` calls."""
    started = time.perf_counter()
    results = answer(engine, requests)
    return sum(r.completion_tokens for r in results) / (time.perf_counter() - started), results


def tokens_per_second(
    engine: CLIPerEngine, requests: list[GenerationRequest], answer: Answer = CLIPerEngine.generate_batch
) -> float:
    """``timed_batch``'s tokens/s."""
    return timed_batch(engine, requests, answer)[0]


def run_bench(engine: CLIPerEngine, max_new_tokens: int = 64, repeats: int = 3) -> BenchResult:
    """Interleave unguided and guided runs of the same prompts (greedy) and take medians; guided runs
    also without the engine's refusal look-ahead, to measure what it costs, and streams of both, timed to
    their first text, and so is a stream of ``DISCLAIMER_PROMPT``, which (on the embedded model) the engine
    drafts further before a guided answer starts.

    Without a trained classifier the guided runs use a freshly initialised shared-backbone head of the
    default architecture: decoding cost does not depend on the head's weights.
    """
    # Copies share the model and classifier but not the settings changed here, so an engine that also
    # serves live requests is left as it was.
    engine = copy.copy(engine)
    label = f"{engine.classifier.kind} ({engine.classifier.config.base_model})" if engine.classifier else ""
    if engine.classifier is None:
        engine.classifier = PreferenceClassifier.create(engine.loaded, list(DEFAULT_CLASSES)).eval()
        label = "shared, untrained head of the default architecture"
    no_lookahead = copy.copy(engine)
    no_lookahead.refusal_lookahead = None

    def single(prompt: str, weights: dict | None) -> GenerationRequest:
        # End-of-turn stays possible; lengths differ per run, tokens/s normalises for that.
        return GenerationRequest(prompt, weights=weights, max_new_tokens=max_new_tokens)

    def first_text(prompt: str, weights: dict | None, tokens: int) -> tuple[float, GenerationResult]:
        return _first_text_seconds(engine, GenerationRequest(prompt, weights=weights, max_new_tokens=tokens))

    # a disclaimer's answer is guided after its draft: stream that far and a little further
    disclaimer_tokens = (engine.disclaimer_lookahead or 0) + STREAM_TOKENS
    engine.generate(single(BENCH_PROMPTS[0], WEIGHT_SETS[0]))  # warm-up
    unguided, guided, without_lookahead, batched, unguided_first, guided_first = [], [], [], [], [], []
    disclaimer_unguided, disclaimer_guided, disclaimer_judged, batched_disclaimer, threaded = [], [], [], [], []
    for _ in range(repeats):
        for prompt, weights in zip(BENCH_PROMPTS, WEIGHT_SETS, strict=False):
            unguided.append(tokens_per_second(engine, [single(prompt, None)]))
            guided.append(tokens_per_second(engine, [single(prompt, weights)]))
            without_lookahead.append(tokens_per_second(no_lookahead, [single(prompt, weights)]))
            unguided_first.append(first_text(prompt, None, STREAM_TOKENS)[0])
            guided_first.append(first_text(prompt, weights, STREAM_TOKENS)[0])
        disclaimer_unguided.append(first_text(DISCLAIMER_PROMPT, None, disclaimer_tokens)[0])
        seconds, result = first_text(DISCLAIMER_PROMPT, WEIGHT_SETS[0], disclaimer_tokens)
        disclaimer_guided.append(seconds)
        disclaimer_judged.append(any(warning.startswith(DISCLAIMER_WARNING) for warning in result.warnings))
        batched.append(tokens_per_second(engine, batch_of_eight(max_new_tokens)))
        batched_disclaimer.append(tokens_per_second(engine, batch_of_eight(max_new_tokens, True, disclaimer_tokens)))
        threaded.append(tokens_per_second(engine, batch_of_eight(max_new_tokens)[:4], each_on_a_thread))
    unguided_tok_s, guided_tok_s = statistics.median(unguided), statistics.median(guided)
    without_lookahead_tok_s = statistics.median(without_lookahead)
    batch8 = statistics.median(batched)
    return BenchResult(
        model=engine.loaded.name,
        classifier=label,
        unguided_tok_s=round(unguided_tok_s, 2),
        guided_tok_s=round(guided_tok_s, 2),
        ratio=round(guided_tok_s / unguided_tok_s, 3),
        refusal_lookahead=engine.refusal_lookahead,
        guided_without_lookahead_tok_s=round(without_lookahead_tok_s, 2),
        lookahead_ratio=round(guided_tok_s / without_lookahead_tok_s, 3),
        single_guided_tok_s=round(guided_tok_s, 2),
        unguided_first_text_s=round(statistics.median(unguided_first), 3),
        guided_first_text_s=round(statistics.median(guided_first), 3),
        disclaimer_lookahead=engine.disclaimer_lookahead,
        disclaimer_guided=all(disclaimer_judged),
        disclaimer_unguided_first_text_s=round(statistics.median(disclaimer_unguided), 3),
        disclaimer_guided_first_text_s=round(statistics.median(disclaimer_guided), 3),
        batch8_tok_s=round(batch8, 2),
        batch8_speedup=round(batch8 / guided_tok_s, 2),
        batch8_disclaimer_tok_s=round(statistics.median(batched_disclaimer), 2),
        threads4_tok_s=round(statistics.median(threaded), 2),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        max_new_tokens=max_new_tokens,
        repeats=repeats,
        torch_threads=torch.get_num_threads(),
        machine=f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
    )
