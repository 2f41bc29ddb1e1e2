"""``cliper eval``: does guidance move the answers the way each class asks, and at what fluency cost?

For each class (and a few combinations) four settings are compared on evaluation prompts: unguided,
preference prompting only, guidance only, prompting plus guidance; then an α sweep. Metrics come from
independent libraries (``metrics.py``). Every response is kept with its metrics (``results_responses.jsonl``)
so that a run resumes and a full evaluation set can be built up over several runs; the Markdown report,
``results.json`` and the α plot are then computed from the stored responses.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from types import ModuleType

import numpy as np
from scipy.stats import bootstrap
from tqdm.auto import tqdm

from cliper_integrations.core import logits_processor
from cliper_integrations.core.engine import CLIPerEngine, GenerationRequest, GenerationResult
from cliper_integrations.core.errors import EvalStoreError
from cliper_integrations.core.preferences import is_disclaimer, is_refusal, preference_request
from cliper_integrations.core.prompting import Message
from cliper_integrations.evaluation.metrics import distinct_n, fk_grade, perplexity, vader_compound, word_count

SETTINGS = {
    "unguided": {"guided": False, "prompted": False},
    "prompt": {"guided": False, "prompted": True},
    "guidance": {"guided": True, "prompted": False},
    "prompt+guidance": {"guided": True, "prompted": True},
}
# What each class should move, and the target ratio/difference against unguided (from the issue).
TARGETS = {
    "concise": ("words", "ratio<=", 0.6),
    "informative": ("words", "ratio>=", 1.3),
    "elementary": ("fk_grade", "diff<=", -2.0),
    "expert": ("fk_grade", "diff>=", 2.0),
    "friendly": ("vader", "diff>=", 0.2),
    "unfriendly": ("vader", "diff<=", -0.2),
}
# How each target metric is read over a setting's answers: lengths and sentiment by their mean, the grade by its
# median (a table or a list without full stops reads as one sentence of 150 words: grade 50).
CENTRES = {"words": np.mean, "fk_grade": np.median, "vader": np.mean}
CONFIDENCE, RESAMPLES = 0.95, 9_999
RESPONSES_FILE = "results_responses.jsonl"
COMBINATIONS = [("concise", "friendly"), ("elementary", "friendly"), ("expert", "informative", "unfriendly")]
# Answers the model itself ends in fewer words than this are counted as stopped short: perplexity (a
# mean per token) and distinct-2 (which rises as answers shrink) do not see guidance that ends an answer
# after a word or two (docs/classifier.md, "Unfriendly alone at α 40 or 48?").
SHORT_ANSWER_WORDS = 5
# An answer the model ended itself on one of these (or on a letter or digit) stops mid-sentence, unless it
# declines: guidance that lifts an implausible end cuts answers off so (docs/classifier.md, "End-of-turn tokens
# held to the floor on rows that weigh ending"). A list's last item counts too; the unguided rate is the reference.
MID_SENTENCE_ENDINGS = ",;:(-"


@dataclass
class EvalConfig:
    prompts_file: Path
    output: Path = Path("docs")
    limit: int | None = None
    alpha: float = 8.0
    guided_alpha: dict[str, float] = field(default_factory=dict)
    """Per class, α for guidance alone (classes not named: ``alpha``): what memory's weight becomes for a
    class whose classifier scales it (``unprompted_weight_factors``). The α sweep keeps its own values."""
    prompted_alpha: dict[str, float] = field(default_factory=dict)
    """Per class, α for prompting plus guidance, also in the combinations (classes not named: ``alpha``).
    With the request also in the prompt, the prompt already moves the answer part of the way, so less
    guidance may reach the target at less fluency cost; choose it on training-side prompts
    (``benchmarks/steering_probe.py --setting prompt+guidance``)."""
    sweep: tuple[float, ...] = (0.0, 2.0, 4.0, 8.0, 16.0)
    sweep_limit: int | None = None
    """Answer the sweep's other α values on the first N prompts only (None: every prompt); the plot then
    reads every α on those prompts. The sweep costs nearly as much as the table, which it need not hold up."""
    max_new_tokens: int = 160
    batch_size: int = 8
    classes: tuple[str, ...] = tuple(TARGETS)
    combinations: list[tuple[str, ...]] = field(default_factory=lambda: list(COMBINATIONS))
    restart: bool = False
    reuse_from: tuple[Path, ...] = ()
    """Other runs' output folders whose answers this run would make alike it takes instead of answering
    them again: those made without guidance (unguided, prompting only), which depend on the model, prompts
    and token budget only, and, where guidance's settings are the same too, the guided answers of every
    job whose classes this run's classifier guides exactly as that run's did (``guidance_digest(classes)``:
    a classifier that replaces one part keeps the other classes' answers). Where two folders hold the same
    answer, the first named gives it."""

    def job(self, classes: tuple[str, ...], setting: str) -> Job:
        """The job answering ``classes`` in ``setting`` at this run's α (with guidance off, the α only keys it)."""
        per_class = {"guidance": self.guided_alpha, "prompt+guidance": self.prompted_alpha}.get(setting, {})
        alphas = tuple(per_class.get(name, self.alpha) for name in classes)
        return Job(classes, setting, alphas[0] if len(set(alphas)) == 1 else alphas)


@dataclass(frozen=True)
class Job:
    """One way of answering every prompt: ``classes`` requested in ``setting`` at weight ``alpha``, one
    for all of them or one per class."""

    classes: tuple[str, ...]
    setting: str
    alpha: float | tuple[float, ...]

    @property
    def weights(self) -> dict[str, float]:
        alphas = self.alpha if isinstance(self.alpha, tuple) else (self.alpha,) * len(self.classes)
        return dict(zip(self.classes, alphas, strict=True))

    @property
    def request(self) -> str | None:
        """A digest of the plain-words request the job writes into its prompts (None where it writes none):
        an answer asked for in other words must not stand for this job's, though nothing else differs."""
        if not SETTINGS[self.setting]["prompted"]:
            return None
        return hashlib.sha256(preference_request(self.weights).encode()).hexdigest()[:16]

    @property
    def key(self) -> str:
        alphas = self.alpha if isinstance(self.alpha, tuple) else (self.alpha,)
        return f"{'+'.join(self.classes) or '-'}|{self.setting}|{','.join(f'{a:g}' for a in alphas)}"

    @classmethod
    def from_key(cls, key: str) -> Job:
        """The job a stored answer's ``key`` names."""
        classes, setting, alphas = key.split("|")
        values = tuple(float(alpha) for alpha in alphas.split(","))
        names = () if classes == "-" else tuple(classes.split("+"))
        return cls(names, setting, values if len(values) > 1 else values[0])


def plan(config: EvalConfig) -> list[Job]:
    """Unguided, the three other settings per class, the combinations among those classes, then the rest
    of the α sweep (α = 0 is the unguided job and the class's guidance α the "guidance" one: each is run
    once)."""
    jobs = [Job((), "unguided", 0.0)]
    jobs += [config.job((name,), setting) for name in config.classes for setting in SETTINGS if setting != "unguided"]
    jobs += [
        config.job(tuple(combo), "prompt+guidance")
        for combo in config.combinations
        if set(combo) <= set(config.classes)
    ]
    jobs += [
        Job((name,), "guidance", alpha)
        for name in config.classes
        for alpha in config.sweep
        if alpha not in (0, config.job((name,), "guidance").alpha)
    ]
    return jobs


def load_prompts(path: Path, limit: int | None) -> list[tuple[int, str]]:
    """(id, prompt) pairs of an evaluation file, the first ``limit`` of them."""
    records = json.loads(path.read_text())
    return [(record.get("id", index), record["prompt"]) for index, record in enumerate(records)][:limit]


def code_digest(module: ModuleType) -> str:
    """A hash of a module's code rather than its text: docstrings, comments and layout are left out, so
    rewording them keeps every answer stored under the code (``decoding_rule``), while any change to what
    it does strands them."""
    tree = ast.parse(inspect.getsource(module))
    for node in ast.walk(tree):
        documented = isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        if documented and ast.get_docstring(node, clean=False) is not None:
            node.body = node.body[1:]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:16]


def run_signature(engine: CLIPerEngine, config: EvalConfig) -> dict[str, object]:
    """What every stored response depends on besides its prompt and job: records made under another
    signature (a classifier that steers differently, candidate count, loop guard, plausibility floor,
    refusal look-ahead, token budget, prompt file, or another version of the decoding rule's code) must not
    be mixed into one table."""
    assert engine.classifier is not None
    return {
        **unguided_signature(engine, config.prompts_file, config.max_new_tokens),
        "classifier": engine.classifier.guidance_digest(),
        "decoding_rule": code_digest(logits_processor),
        "top_k": engine.top_k,
        "guided_no_repeat_ngram": engine.guided_no_repeat_ngram,
        "guided_plausibility": engine.guided_plausibility,
        "refusal_lookahead": engine.refusal_lookahead,
        # with the look-ahead, a guided opening that declines is answered again (engine.py, _OpeningCheck)
        "guided_opening_check": bool(engine.refusal_lookahead),
        "declines": qualified_name(engine.declines),
        # with the look-ahead, a prompted row that declines only when asked starts from the plain question's
        # opening (engine.py, _open_without_request)
        "unrequested_opening": bool(engine.refusal_lookahead),
        # with the look-ahead, an opening that declines with a disclaimer is drafted further (_judge_openings)
        "disclaimer_lookahead": engine.disclaimer_lookahead if engine.refusal_lookahead else None,
        "disclaims": qualified_name(engine.disclaims),
    }


def qualified_name(function: object) -> str:
    """How a run signature names a function (the engine's ``declines``)."""
    return f"{function.__module__}.{function.__qualname__}"


DECLINED_ONLY_SIGNATURE = ("unrequested_opening",)
"""The parts of a run signature that change only prompted, guided answers whose opening declines: a store
made without them still lends its other answers (``ResponseStore.adopt``)."""

DISCLAIMER_SIGNATURE = ("disclaimer_lookahead", "disclaims")
"""The parts of a run signature that change only guided answers to prompts the base model opens with a disclaimer
("As an AI …"): a store made without them still lends its answers to every other prompt (``ResponseStore.adopt``)."""


UNGUIDED_SIGNATURE = ("model", "dtype", "prompts_file", "max_new_tokens", "decoding")
"""The parts of a run signature that answers made without guidance depend on."""


def unguided_signature(engine: CLIPerEngine, prompts_file: Path, max_new_tokens: int) -> dict[str, object]:
    """The ``UNGUIDED_SIGNATURE`` part of a run signature."""
    values = (engine.loaded.name, engine.loaded.dtype, prompts_file.name, max_new_tokens, "greedy")
    return dict(zip(UNGUIDED_SIGNATURE, values, strict=True))


def read_store(path: Path) -> tuple[dict[str, object], list[dict], bool]:
    """A store's run signature, its records, and whether its last line was broken (a run killed
    mid-write leaves at most that one; a broken line elsewhere is an error)."""
    header, *lines = path.read_text().splitlines()
    signature = {"dtype": "float32", **json.loads(header).get("run", {})}  # before the dtype was recorded
    records = []
    for number, line in enumerate(lines, start=2):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines) + 1:
                return signature, records, True
            raise EvalStoreError(f"{path}, line {number}: {error}; pass --restart to start over") from error
    return signature, records, False


class ResponseStore:
    """Every evaluated response with its metrics, one JSON line each after a header line holding the run
    signature. Appended as the run goes, so an interrupted run resumes where it stopped and a later run
    with a larger ``--limit`` only answers the prompts that are new."""

    def __init__(self, path: Path, signature: dict[str, object], restart: bool = False) -> None:
        self.path, self.signature = path, signature
        self.records: dict[tuple[int, str], dict] = {}
        if restart:
            path.unlink(missing_ok=True)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"run": signature}) + "\n")
            return
        stored, records, broken = read_store(path)
        if stored != signature:
            raise EvalStoreError(
                f"{path} holds responses of another run ({stored}); this run is {signature}. "
                "Pass --restart to discard them, or write to another --output folder."
            )
        if broken:
            path.write_text("".join(f"{line}\n" for line in path.read_text().splitlines()[:-1]))
        self.records = {(record["prompt_id"], record["job"]): record for record in records}

    def missing(self, job: Job, prompts: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """The prompts the store holds no answer of ``job`` to, counting one asked for in other words as none."""
        return [(pid, prompt) for pid, prompt in prompts if not self._holds(self.records.get((pid, job.key)), job)]

    @staticmethod
    def _holds(record: dict | None, job: Job) -> bool:
        """Whether ``record`` answers ``job`` as this code asks it (a prompted answer made before answers
        recorded their request holds none)."""
        return record is not None and record.get("request") == job.request

    def add(self, records: list[dict]) -> None:
        with self.path.open("a") as handle:
            handle.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
        self.records.update({(record["prompt_id"], record["job"]): record for record in records})

    def adopt(self, source: Path, guidance: dict[Job, str | None]) -> int:
        """Take from another run's store ``source`` the answers of the jobs in ``guidance`` that this run
        would make alike, where this one lacks them; returns how many. Those made without guidance (None)
        need the same ``UNGUIDED_SIGNATURE`` (refused otherwise); a guided job's need the rest of the
        signature the same and the job's ``guidance_digest`` equal to the one the answer records it was made
        with (a store from before answers recorded it: that run's whole classifier's), so answers a store
        took from a third run can be taken from it again. A prompted answer needs the job's request too. Across
        a ``DECLINED_ONLY_SIGNATURE`` part, a prompted, guided answer is taken only where it does not open
        with a refusal (the ``refusal`` it records, where the engine ``declines`` by ``is_refusal``). Across a
        ``DISCLAIMER_SIGNATURE`` part, a guided answer is taken only for a prompt none of whose stored answers opens
        with a disclaimer (``is_disclaimer``, where the engine ``disclaims`` by it): the base model's greedy answers
        (unguided, and each class's prompt alone) open as its drafts do."""
        if not source.is_file():
            raise EvalStoreError(f"{source}: no stored responses to take the answers from")
        theirs, records, _ = read_store(source)
        if differs := [key for key in UNGUIDED_SIGNATURE if theirs.get(key) != self.signature.get(key)]:
            raise EvalStoreError(
                f"{source} was answered with another {', '.join(differs)} "
                f"({', '.join(f'{theirs.get(key)} vs {self.signature.get(key)}' for key in differs)})"
            )
        apart = ("classifier", *DECLINED_ONLY_SIGNATURE, *DISCLAIMER_SIGNATURE)
        same_guidance = all(theirs.get(key) == value for key, value in self.signature.items() if key not in apart)
        wanted = {job.key: (job, digest) for job, digest in guidance.items() if same_guidance or digest is None}
        # a record's ``refusal`` flag covers every answer whose opening ``declines`` only when that is is_refusal
        declined_apart = any(theirs.get(key) != self.signature.get(key) for key in DECLINED_ONLY_SIGNATURE)
        refusals_known = self.signature.get("declines") == qualified_name(is_refusal)
        disclaimer_apart = any(theirs.get(key) != self.signature.get(key) for key in DISCLAIMER_SIGNATURE)
        disclaimers_known = self.signature.get("disclaims") == qualified_name(is_disclaimer)
        hedged = {record["prompt_id"] for record in records if is_disclaimer(record["response"])}

        def alike(record: dict) -> bool:
            job, digest = wanted[record["job"]]
            lacking = not self._holds(self.records.get((record["prompt_id"], job.key)), job)
            made_with = record.get("guidance", theirs.get("classifier"))
            asked_and_guided = digest is not None and SETTINGS[job.setting]["prompted"]
            if declined_apart and asked_and_guided and (record["refusal"] or not refusals_known):
                return False
            if disclaimer_apart and digest is not None and (record["prompt_id"] in hedged or not disclaimers_known):
                return False
            return lacking and self._holds(record, job) and digest in (None, made_with)

        adopted = [r for r in records if r["job"] in wanted and alike(r)]
        self.add(adopted)
        return len(adopted)

    def responses(self, job: Job, prompts: list[tuple[int, str]]) -> list[dict]:
        return [self.records[(pid, job.key)] for pid, _ in prompts]


def guidance_of(engine: CLIPerEngine, job: Job) -> str | None:
    """The ``guidance_digest`` of the job's classes its answers record; None for a job without guidance."""
    setting = SETTINGS[job.setting]
    return engine.classifier.guidance_digest(job.classes, setting["prompted"]) if setting["guided"] else None


def response_record(
    engine: CLIPerEngine, job: Job, guidance: str | None, prompt_id: int, prompt: str, result: GenerationResult
) -> dict:
    """One answer with its metrics; ``guidance`` is the ``guidance_digest`` of the job's classes it was made
    with (None without guidance), which decides where else the answer may be taken for (``adopt``)."""
    response = result.text
    return {
        "prompt_id": prompt_id,
        "job": job.key,
        "guidance": guidance,
        "request": job.request,
        "response": response,
        "finish_reason": result.finish_reason,
        "words": word_count(response),
        "fk_grade": fk_grade(response),
        "vader": vader_compound(response),
        "perplexity": perplexity(engine, prompt, response),
        # guidance must not buy its style by declining the task (DESIGN.md: refusals were distinctive)
        "refusal": is_refusal(response),
    }


def declines(engine: CLIPerEngine, response: str) -> bool:
    """Whether an answer declines the task, as the engine judges its base model's drafts: an answer its
    ``declines`` flags, except one that opens with a disclaimer (``disclaims``: "As an AI …") and goes on
    past ``disclaimer_lookahead`` tokens, which hedges and then answers."""
    if not engine.declines(response):
        return False
    if engine.disclaimer_lookahead is None or not engine.disclaims(response):
        return True
    return len(engine.tokenizer(response, add_special_tokens=False)["input_ids"]) < engine.disclaimer_lookahead


def summarize(records: list[dict], declined: Callable[[dict], bool] = itemgetter("refusal")) -> dict[str, float]:
    """A setting's metrics over its responses: means, distinct-2 over all of them, and medians for the two
    metrics without an upper bound, where a few answers would dominate a mean: perplexity (run-on answers;
    empty answers have none and are left out) and Flesch-Kincaid grade (a table or a list without full
    stops reads as one sentence of 150 words: grade 50; ``CENTRES``). ``cut_off``: the share of answers that ran out of
    new tokens (NaN when a record predates it): a length ratio means little where answers were cut off.
    ``stopped_short``: the share the model ended itself in fewer than ``SHORT_ANSWER_WORDS`` words (NaN likewise).
    ``unfinished``: the share the model ended itself mid-sentence, not declining (``ends_mid_sentence``; NaN likewise).
    ``refusals``: the share ``declined`` (by default the ``refusal`` each answer records: ``is_refusal``)."""
    perplexities = [r["perplexity"] for r in records if math.isfinite(r["perplexity"])]
    refused = [declined(r) for r in records]
    centred = {metric: float(centre([r[metric] for r in records])) for metric, centre in CENTRES.items()}
    return {
        **centred,
        "distinct2": distinct_n([r["response"] for r in records], 2),
        "perplexity": statistics.median(perplexities) if perplexities else float("nan"),
        "refusals": statistics.mean(refused),
        **_ending_shares(records, refused),
    }


def _ending_shares(records: list[dict], refused: list[bool]) -> dict[str, float]:
    """``summarize``'s shares of how answers ended (``cut_off``, ``stopped_short``, ``unfinished``), all NaN where
    a record predates ``finish_reason``."""
    if not all("finish_reason" in r for r in records):
        return dict.fromkeys(("cut_off", "stopped_short", "unfinished"), float("nan"))
    return {
        "cut_off": statistics.mean(r["finish_reason"] == "length" for r in records),
        "stopped_short": statistics.mean(
            r["finish_reason"] == "stop" and r["words"] < SHORT_ANSWER_WORDS for r in records
        ),
        "unfinished": statistics.mean(
            ends_mid_sentence(r) and not refusal for r, refusal in zip(records, refused, strict=True)
        ),
    }


def ends_mid_sentence(record: dict) -> bool:
    """Whether the model itself ended an answer on a letter, a digit or ``MID_SENTENCE_ENDINGS``."""
    text = record["response"].rstrip()
    return record["finish_reason"] == "stop" and bool(text) and (text[-1].isalnum() or text[-1] in MID_SENTENCE_ENDINGS)


def job_request(prompt: str | Sequence[Message], job: Job, config: EvalConfig) -> GenerationRequest:
    """What the engine is asked for one prompt of a job: its weights, guided and prompted as its setting says."""
    flags = SETTINGS[job.setting]
    return GenerationRequest(
        prompt,
        weights=job.weights,
        guidance=flags["guided"],
        preference_prompt=flags["prompted"],
        max_new_tokens=config.max_new_tokens,
    )


def generate_rows(
    engine: CLIPerEngine, rows: Sequence[tuple[Job, str | Sequence[Message]]], config: EvalConfig
) -> list[GenerationResult]:
    """Answer (job, prompt) rows, of one job or several, in one ``generate_batch`` call."""
    return engine.generate_batch([job_request(prompt, job, config) for job, prompt in rows])


def generate(
    engine: CLIPerEngine, prompts: Sequence[str | Sequence[Message]], job: Job, config: EvalConfig
) -> list[GenerationResult]:
    """Answer one job's prompts."""
    return generate_rows(engine, [(job, prompt) for prompt in prompts], config)


def _share(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.0%}"


def _ratio(value: float, reference: float) -> float:
    return value / reference if reference else float("nan")


def is_ratio(name: str) -> bool:
    """Whether the class's target is read as a ratio to unguided (else as a difference)."""
    return TARGETS[name][1].startswith("ratio")


def verdict(name: str, base: dict[str, float], row: dict[str, float]) -> str:
    """The class's target metric against ``base`` (ratio or difference) and whether the target is met."""
    metric, rule, target = TARGETS[name]
    if is_ratio(name):
        value = _ratio(row[metric], base[metric])
        met = value <= target if rule == "ratio<=" else value >= target
        return f"{value:.2f}× {'✔' if met else '✘'}"
    value = row[metric] - base[metric]
    met = value <= target if rule == "diff<=" else value >= target
    return f"{value:+.2f} {'✔' if met else '✘'}"


def paired_interval(metric: str, records: list[dict], reference: list[dict], ratio: bool) -> tuple[float, float]:
    """A ``CONFIDENCE`` interval for ``metric``'s centre over ``records`` against ``reference`` (their ratio,
    or else their difference), by a seeded percentile bootstrap of ``RESAMPLES`` draws of the prompts.

    Resampling prompts, each answer beside the reference's answer to the same prompt, shows how far the
    figure depends on which prompts the set happens to hold; the prompts' own spread (a list against a
    one-word fact) cancels in the pairing. NaNs where fewer than two prompts were answered."""
    if [r["prompt_id"] for r in records] != [r["prompt_id"] for r in reference]:
        raise EvalStoreError("A paired interval needs answers to the same prompts, in the same order")
    if len(records) < 2:
        return float("nan"), float("nan")
    centre = CENTRES[metric]

    def statistic(values: np.ndarray, against: np.ndarray, axis: int = -1) -> np.ndarray:
        mine, theirs = centre(values, axis=axis), centre(against, axis=axis)
        return mine / theirs if ratio else mine - theirs

    samples = tuple(np.array([r[metric] for r in answers], dtype=float) for answers in (records, reference))
    interval = bootstrap(
        samples,
        statistic,
        paired=True,
        vectorized=True,
        confidence_level=CONFIDENCE,
        n_resamples=RESAMPLES,
        method="percentile",
        rng=np.random.default_rng(0),
    ).confidence_interval
    return float(interval.low), float(interval.high)


def target_intervals(name: str, answers: dict[str, list[dict]]) -> dict[str, tuple[float, float]]:
    """``paired_interval`` for each figure the targets table gives a class: guidance alone and prompting
    plus guidance against unguided (as ``verdict`` reads it), and prompting plus guidance against prompting
    alone (a difference, as ``moves_further`` reads it). ``answers`` holds each setting's answers."""
    metric, ratio = TARGETS[name][0], is_ratio(name)
    return {
        "guidance": paired_interval(metric, answers["guidance"], answers["unguided"], ratio),
        "prompt+guidance": paired_interval(metric, answers["prompt+guidance"], answers["unguided"], ratio),
        "prompt+guidance vs prompt": paired_interval(metric, answers["prompt+guidance"], answers["prompt"], False),
    }


def moves_further(name: str, prompt_only: dict[str, float], combined: dict[str, float]) -> str:
    """Does adding guidance to the prompt move the class's metric further in the requested direction?
    A difference that rounds to zero at the printed precision is a tie, which does not beat the prompt."""
    metric, rule, _ = TARGETS[name]
    delta = round(combined[metric] - prompt_only[metric], 2)
    if delta == 0:
        return "±0.00 ✘ (tie)"
    right = delta < 0 if rule.endswith("<=") else delta > 0
    return f"{delta:+.2f} {'✔' if right else '✘'}"


def fluency(base: dict[str, float], row: dict[str, float]) -> str:
    """Perplexity ≤ 1.5× and distinct-2 ≥ 0.9× the unguided answers."""
    ppl, distinct = _ratio(row["perplexity"], base["perplexity"]), _ratio(row["distinct2"], base["distinct2"])
    return f"ppl {ppl:.2f}× {'✔' if ppl <= 1.5 else '✘'}, distinct-2 {distinct:.2f}× {'✔' if distinct >= 0.9 else '✘'}"


def run_eval(engine: CLIPerEngine, config: EvalConfig) -> dict:
    """Answer what is not yet stored, then measure, plot and write the report; returns all numbers.

    Prompts are taken ``batch_size`` at a time through every job, so an interrupted run keeps whole
    prompts and the next run (same command) goes on from there. Each ``generate`` call decodes
    ``batch_size`` answers in job order: one job's prompts where a chunk holds that many, so a full set is
    decoded in the same batches job by job; several jobs' where it holds fewer (``--limit``, or the last
    prompts), so a quick check makes as few calls as a full batch allows.
    """
    prompts = load_prompts(config.prompts_file, config.limit)
    sweep_prompts = prompts[: config.sweep_limit]
    jobs = plan(config)
    sweep_only = {job for job in jobs if job.setting == "guidance" and job != config.job(job.classes, "guidance")}
    answered = {job: sweep_prompts if job in sweep_only else prompts for job in jobs}
    store = ResponseStore(config.output / RESPONSES_FILE, run_signature(engine, config), config.restart)
    guidance = {job: guidance_of(engine, job) for job in jobs}
    for source in config.reuse_from:
        store.adopt(source / RESPONSES_FILE, guidance)
    bar = tqdm(total=sum(len(store.missing(job, answered[job])) for job in jobs), desc="Evaluating", unit="response")
    for start in range(0, len(prompts), config.batch_size):
        chunk = prompts[start : start + config.batch_size]
        wanted = [
            (job, pid, prompt)
            for job in jobs
            for pid, prompt in store.missing(job, [prompt for prompt in chunk if prompt in answered[job]])
        ]
        for first in range(0, len(wanted), config.batch_size):
            rows = wanted[first : first + config.batch_size]
            results = generate_rows(engine, [(job, prompt) for job, _, prompt in rows], config)
            store.add(
                [
                    response_record(engine, job, guidance[job], pid, prompt, result)
                    for (job, pid, prompt), result in zip(rows, results, strict=True)
                ]
            )
            bar.update(len(rows))
    bar.close()

    def declined(record: dict) -> bool:
        return declines(engine, record["response"])

    measured = {job: summarize(store.responses(job, prompts), declined) for job in jobs if job not in sweep_only}
    table: dict[str, dict[str, dict[str, float]]] = {}
    for job, row in measured.items():
        if job.setting != "unguided":
            table.setdefault("+".join(job.classes), {})[job.setting] = row
    intervals = {
        name: target_intervals(
            name,
            {"unguided": store.responses(jobs[0], prompts)}
            | {setting: store.responses(config.job((name,), setting), prompts) for setting in table[name]},
        )
        for name in TARGETS
        if name in table
    }
    sweep: dict[str, dict[str, dict[str, float]]] = {}
    if config.sweep:  # without one (``--no-sweep``) there is no plot and no sweep line in the report
        unguided = summarize(store.responses(jobs[0], sweep_prompts), declined)
        sweep = {name: {"0.0": unguided} for name in config.classes}
        for job in jobs:
            if job.setting == "guidance" and len(job.classes) == 1:
                sweep[job.classes[0]][str(float(job.alpha))] = summarize(store.responses(job, sweep_prompts), declined)
    results = {
        "prompts": len(prompts),
        "sweep_prompts": len(sweep_prompts),
        "file": str(config.prompts_file),
        "alpha": config.alpha,
        "guided_alpha": {name: config.job((name,), "guidance").alpha for name in config.classes},
        "prompted_alpha": {name: config.job((name,), "prompt+guidance").alpha for name in config.classes},
        "plausibility": {
            "engine": engine.guided_plausibility,
            "classes": {
                setting: {
                    n: f for n, f in engine.classifier.config.setting_floors(prompted).items() if n in config.classes
                }
                for setting, prompted in (("guidance", False), ("prompt+guidance", True))
            },
        },
        "loop_guard": {
            "no_repeat_ngram": engine.guided_no_repeat_ngram,
            "favourite_ngrams": {
                setting: {n: rule for n, rule in rules.items() if n in config.classes}
                for setting, rules in (
                    ("guidance", engine.classifier.config.unprompted_favourite_ngrams),
                    ("prompt+guidance", engine.classifier.config.prompted_favourite_ngrams),
                )
            },
        },
        "unguided": measured[jobs[0]],
        "table": table,
        "intervals": intervals,
        "sweep": sweep,
    }
    if sweep:
        plot_sweep(sweep, config.output / "results_alpha_sweep.png")
    (config.output / "results.json").write_text(json.dumps(results, indent=2))
    write_report(config.output / "results.md", report(results, config))
    return results


def plot_sweep(sweep: dict[str, dict[str, dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["words", "fk_grade", "vader", "distinct2", "perplexity"]
    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.5))
    for axis, metric in zip(axes, metrics, strict=True):
        for name, points in sweep.items():
            alphas = sorted(points, key=float)
            axis.plot([float(a) for a in alphas], [points[a][metric] for a in alphas], marker="o", label=name)
        axis.set_title(metric)
        axis.set_xlabel("α (guidance only)")
    axes[0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


NOTES_MARKER = "<!-- Notes below this line are written by hand and kept when `cliper eval` rewrites the page. -->"


def write_report(path: Path, text: str) -> None:
    """Write the generated report, keeping the hand-written notes (why a target was missed) of a previous run."""
    notes = NOTES_MARKER + "\n"
    if path.exists() and NOTES_MARKER in (previous := path.read_text()):
        notes = previous[previous.index(NOTES_MARKER) :]
    path.write_text(text + "\n" + notes)


def _bracket(interval: Sequence[float], ratio: bool = False) -> str:
    """An interval as the targets table prints it (nothing where too few prompts were answered for one)."""
    low, high = interval
    if math.isnan(low):
        return ""
    return f"[{low:.2f}×, {high:.2f}×]" if ratio else f"[{low:+.2f}, {high:+.2f}]"


def _other_alphas(results: dict) -> str:
    """Where guidance alone or prompting plus guidance runs at other α values, which."""
    parts = []
    for key, setting in (("guided_alpha", "guidance alone"), ("prompted_alpha", "prompting plus guidance")):
        other = {name: alpha for name, alpha in results[key].items() if alpha != results["alpha"]}
        if other:
            parts.append(f"{setting}: " + ", ".join(f"{name} α = {alpha:g}" for name, alpha in other.items()))
    return f" ({'; '.join(parts)})" if parts else ""


def _loop_guard(results: dict) -> str:
    """The loop guard guided rows decode under, and the classes whose rows hold the base model's favourite
    to a rule of their own, per setting."""
    guard = results["loop_guard"]
    if guard["no_repeat_ngram"] is None:
        return "no loop guard"
    rules = [
        f"{name} {setting}: " + ("spared" if n is None else f"banned only from repeating {n}-grams")
        for setting, named in guard["favourite_ngrams"].items()
        for name, n in named.items()
    ]
    held = f" (the base model's favourite token, by the classifier's own rule: {'; '.join(rules)})" if rules else ""
    return f"a loop guard against repeated {guard['no_repeat_ngram']}-grams{held}"


def _floors(results: dict) -> str:
    """The plausibility floor guided rows decode under, and the classes the classifier holds to a stricter
    one: named once where both settings share it, else per setting."""
    engine, by_setting = results["plausibility"]["engine"], results["plausibility"]["classes"]
    text = f"guided rows under a plausibility floor {engine:g}" if engine is not None else "guided rows with no floor"
    stricter = []
    for name in dict.fromkeys(name for floors in by_setting.values() for name in floors):
        floors = {setting: own[name] for setting, own in by_setting.items() if name in own}
        if len(floors) == len(by_setting) and len(set(floors.values())) == 1:
            stricter.append(f"{name} {floors['guidance']:g}")
        else:
            stricter += [f"{name} {floor:g} with {setting}" for setting, floor in floors.items()]
    return f"{text} ({', '.join(stricter)}: the classifier's own)" if stricter else text


def report(results: dict, config: EvalConfig) -> str:
    base = results["unguided"]
    lines = [
        "# Steering results",
        "",
        f"Generated by `cliper eval` on `{results['file']}` ({results['prompts']} prompts), greedy decoding, "
        f"at most {config.max_new_tokens} new tokens, α = {results['alpha']} per requested class"
        f"{_other_alphas(results)}, {_floors(results)}, {_loop_guard(results)}. "
        "FK grade and perplexity are medians over the prompts, the other metrics means; cut off: answers "
        f"that ran out of new tokens; stopped short: answers the model ended in fewer than {SHORT_ANSWER_WORDS} "
        f"words; unfinished: answers the model ended on a word, a digit or one of {' '.join(MID_SENTENCE_ENDINGS)}, "
        "not declining (a "
        "list's last item counts too: compare with the unguided rate) (– where the stored answers predate the "
        "record of how they ended); refusals: answers that decline "
        'the task, not counting those that open "As an AI …" and go on past the engine\'s disclaimer look-ahead '
        "(a hedge, then an answer).",
        "",
        "Unguided: " + ", ".join(f"{k} {v:.2f}" for k, v in base.items() if not math.isnan(v)),
        "",
        "| classes | setting | words | FK grade | VADER | distinct-2 | perplexity | refusals | cut off "
        "| stopped short | unfinished | target vs unguided |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for classes, settings in results["table"].items():
        for setting, row in settings.items():
            target = verdict(classes, base, row) if classes in TARGETS else ""
            lines.append(
                f"| {classes} | {setting} | {row['words']:.1f} | {row['fk_grade']:.2f} | {row['vader']:.3f} | "
                f"{row['distinct2']:.3f} | {row['perplexity']:.2f} | {row['refusals']:.0%} | {_share(row['cut_off'])} "
                f"| {_share(row['stopped_short'])} | {_share(row['unfinished'])} | {target} |"
            )
    lines += [
        "",
        "## Targets (guided vs unguided; prompting plus guidance vs prompting alone)",
        "",
        f"In brackets, a {CONFIDENCE:.0%} interval for each figure: a paired bootstrap over the prompts "
        "(percentile, seeded), i.e. how far the figure would move on another draw of as many prompts like these. "
        "✔ and ✘ read the figure itself; where the interval holds the target, this set cannot tell a miss from a "
        "pass.",
        "",
        "| class | guidance | prompt+guidance | prompt+guidance vs prompt | fluency (guidance) "
        "| fluency (prompt+guidance) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in TARGETS:
        if name in results["table"]:
            row, interval = results["table"][name], results["intervals"][name]
            ratio = is_ratio(name)
            figures = [
                f"{verdict(name, base, row['guidance'])} {_bracket(interval['guidance'], ratio)}",
                f"{verdict(name, base, row['prompt+guidance'])} {_bracket(interval['prompt+guidance'], ratio)}",
                f"{moves_further(name, row['prompt'], row['prompt+guidance'])} "
                f"{_bracket(interval['prompt+guidance vs prompt'])}",
                fluency(base, row["guidance"]),
                fluency(base, row["prompt+guidance"]),
            ]
            lines.append(f"| {name} | {' | '.join(figures)} |")
    if results["sweep"]:
        lines += [
            "",
            f"α sweep (guidance only) on the first {results['sweep_prompts']} prompts:",
            "",
            "![metrics against α](results_alpha_sweep.png)",
        ]
    return "\n".join([*lines, ""])
