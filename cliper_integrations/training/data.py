"""Build the classifier's training data the paper's way: ask the base model for each class in plain words.

Each (instruction, class) pair is answered by the base model with the class's request appended; the
classifier is later trained on (instruction *without* the request, response), so at inference it must
recognise the style from the text alone. Generation is batched per class, seeded and resumable.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tqdm.auto import tqdm

from cliper_integrations.core.engine import CLIPerEngine, GenerationRequest
from cliper_integrations.core.preferences import (
    AXES,
    DEFAULT_CLASSES,
    PREFERENCE_REQUESTS,
    UNREQUESTED,
    axis_of,
    is_refusal,
)
from cliper_integrations.core.prompting import instruction_text, with_preference_request
from cliper_integrations.evaluation.metrics import distinct_n, fk_grade, vader_compound, word_count


def is_degenerate(text: str, n: int = 3, min_words: int = 12, min_distinct: float = 0.6) -> bool:
    """True for answers stuck in a loop (under 60 % distinct word n-grams): what sets their style apart
    is the loop itself, and a classifier trained on them would steer towards repetition."""
    return len(text.split()) >= min_words and distinct_n([text], n) < min_distinct


def _word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z]+(?:['-][a-z]+)*", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def echoes_request(text: str, name: str, n: int = 3) -> bool:
    """True for answers that repeat words of their own class's request (three in a row): "... with a joke
    or two", "no pleasantries, no encouragement, just a blunt answer". The classifier reads the answer
    without the request, so an echo teaches it the request's wording as the style, and guidance then
    pushes answers towards those words over and over. Classes without a built-in request never echo."""
    request = PREFERENCE_REQUESTS.get(name)
    return request is not None and bool(_word_ngrams(request, n) & _word_ngrams(text, n))


# When do two answers to one instruction, asked for the two poles of an axis, show the axis? When they
# differ at least as much as the steering targets ask of guidance (docs/results.md). Measured by the same
# independent libraries as the evaluation, on the training instructions only. Per axis: the measure of one
# answer, and the margin of a (low pole, high pole) pair of measures over the threshold (>= 0 passes), so
# that among several sampled answers per pole the clearest pair wins.
CONTRAST_RULES: dict[str, tuple[Callable[[str], float], Callable[[float, float], float]]] = {
    "expertise": (fk_grade, lambda elementary, expert: expert - elementary - 2.0),
    "length": (word_count, lambda concise, informative: 1.0 - concise / max(0.6 * informative, 1e-9)),
    "tone": (vader_compound, lambda friendly, unfriendly: friendly - unfriendly - 0.4),
}
# The pole of each axis whose answers measure the higher (the other pole's measure the lower).
HIGHER_POLES: dict[str, str] = {"expertise": "expert", "length": "informative", "tone": "friendly"}


def within_limit(name: str, value: float, pole_limits: Mapping[str, float]) -> bool:
    """Whether an answer of class ``name`` measuring ``value`` on its axis passes the class's own limit:
    at least the limit for the pole measured higher, at most it for the other (no limit: passes)."""
    limit = pole_limits.get(name)
    if limit is None:
        return True
    return value >= limit if name == HIGHER_POLES[axis_of(name)] else value <= limit


def parse_pole_limit(spec: str) -> tuple[str, float]:
    """``unfriendly=0`` -> ("unfriendly", 0.0); ValueError for anything that is not CLASS=NUMBER."""
    name, _, bound = spec.partition("=")
    try:
        limit = float(bound)
    except ValueError:
        limit = None
    if not name.strip() or limit is None:
        raise ValueError(f"--pole-limit takes CLASS=NUMBER, got {spec!r}")
    return name.strip(), limit


def keep_contrasting(
    rows: Sequence[dict], pole_limits: Mapping[str, float] | None = None
) -> tuple[list[dict], Counter]:
    """Keep the answers whose text does what their label says, judged against the opposite pole.

    A small model asked for "expert" often writes at the same grade as when asked for "elementary" (half
    of the embedded model's pairs), so the label alone is noise. For each (model, instruction, axis) the
    pair of pole answers (one per pole, from every sample ``cliper data generate --samples`` wrote) with
    the largest margin is kept if it passes the axis's rule; every other answer of that group is dropped.
    A pole without a partner from the same model is dropped. Classes outside the default axes pass
    untouched. ``pole_limits`` (class -> bound on its axis's measure, ``within_limit``) also drops the
    answers that show their pole only against their partner: an "unfriendly" answer can be less warm
    than its friendly partner and still warm (VADER above 0). Returns the kept rows, in their order, and
    how many were dropped per axis.
    """
    pole_limits = pole_limits or {}
    if unknown := [name for name in pole_limits if axis_of(name) not in CONTRAST_RULES]:
        raise ValueError(f"Pole limits name classes that are not on a preference axis: {unknown}")
    groups: dict[tuple[str, str, str], dict[str, list[tuple[float, int]]]] = defaultdict(lambda: defaultdict(list))
    keep: set[int] = set()
    for index, row in enumerate(rows):
        axis = axis_of(row["class"])
        if axis in CONTRAST_RULES:
            measure, _ = CONTRAST_RULES[axis]
            value = measure(row["response"])
            if within_limit(row["class"], value, pole_limits):
                groups[(row.get("model", ""), row["id"], axis)][row["class"]].append((value, index))
        else:
            keep.add(index)
    for (_, _, axis), by_pole in groups.items():
        _, margin_of = CONTRAST_RULES[axis]
        low, high = (by_pole.get(pole, []) for pole in AXES[axis])
        pairs = [(margin_of(low_value, high_value), a, b) for low_value, a in low for high_value, b in high]
        margin, a, b = max(pairs, default=(-1.0, -1, -1))
        if margin >= 0:
            keep.update((a, b))
    dropped = Counter(axis_of(row["class"]) for index, row in enumerate(rows) if index not in keep)
    return [row for index, row in enumerate(rows) if index in keep], dropped


def read_jsonl(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


@dataclass
class DataGenerationConfig:
    instructions: Path
    output: Path
    num_instructions: int = 300
    classes: Sequence[str] = DEFAULT_CLASSES
    max_new_tokens: int = 160
    batch_size: int = 16
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    samples: int = 1
    """Answers per (instruction, class), each with its own seed: the contrast filter keeps the clearest
    pair, for classes a small model rarely shows in one try (its tone pairs pass 4 times in 33)."""


def select_instructions(config: DataGenerationConfig) -> list[dict]:
    """A seeded random choice of instructions, the same on every run (so resuming continues it)."""
    records = list(read_jsonl(config.instructions))
    random.Random(config.seed).shuffle(records)
    return records[: config.num_instructions]


def generate_dataset(engine: CLIPerEngine, config: DataGenerationConfig) -> Counter:
    """Append one JSON line per (instruction, class, sample) to ``config.output``, skipping those already there.

    Returns counts of what was written this run: ``written``, ``refusals``, ``truncated``.
    """
    done = set()
    if config.output.exists():
        done = {(row["id"], row["class"], row.get("sample", 0)) for row in read_jsonl(config.output)}
    chosen = select_instructions(config)
    todo = [
        (record["id"], name, sample)
        for sample in range(config.samples)
        for record in chosen
        for name in config.classes
        if (record["id"], name, sample) not in done
    ]
    counts: Counter = Counter()
    config.output.parent.mkdir(parents=True, exist_ok=True)
    with config.output.open("a", encoding="utf-8") as out, tqdm(total=len(todo), desc="Generating", unit="resp") as bar:
        for sample in range(config.samples):
            for start in range(0, len(chosen), config.batch_size):
                chunk = chosen[start : start + config.batch_size]
                for name in config.classes:
                    batch = [record for record in chunk if (record["id"], name, sample) not in done]
                    if not batch:
                        continue
                    _write_answers(engine, config, batch, name, sample, out, counts)
                    bar.update(len(batch))
                    bar.set_postfix(refusals=counts["refusals"])
    return counts


def answer_seed(seed: int, instruction_id: str, name: str, sample: int) -> int:
    """Each answer's own seed, from what it answers: the engine draws a seeded row the same in any batch, so a
    resumed run, whose batches hold only what is left, writes what an uninterrupted one would."""
    return zlib.crc32(f"{seed}/{instruction_id}/{name}/{sample}".encode())


def _write_answers(
    engine: CLIPerEngine,
    config: DataGenerationConfig,
    batch: list[dict],
    name: str,
    sample: int,
    out: TextIO,
    counts: Counter,
) -> None:
    """Answer one batch of instructions for one class (``UNREQUESTED``: with no request), unguided, and
    append the rows."""
    weights = {} if name == UNREQUESTED else {name: 1.0}
    requests = [
        GenerationRequest(
            with_preference_request([{"role": "user", "content": instruction_text(r)}], weights),
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            seed=answer_seed(config.seed, r["id"], name, sample),
            guidance=False,
        )
        for r in batch
    ]
    for record, result in zip(batch, engine.generate_batch(requests), strict=True):
        row = {
            "id": record["id"],
            "instruction": record["instruction"],
            "input": record.get("input") or "",
            "class": name,
            "sample": sample,
            "response": result.text,
            "new_tokens": result.completion_tokens,
            "truncated": result.finish_reason == "length",
            "refusal": is_refusal(result.text),
            "degenerate": is_degenerate(result.text),
            "model": engine.loaded.name,
        }
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        counts.update(written=1, refusals=int(row["refusal"]), truncated=int(row["truncated"]))
    out.flush()
