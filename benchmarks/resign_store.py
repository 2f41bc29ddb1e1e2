"""Re-sign a ``cliper eval`` store for a new version of the decoding rule's code or of the preference
requests' record, once the current code is shown to make the store's answers again, byte for byte.

A store's run signature holds ``decoding_rule``, a hash of ``logits_processor.py``'s code (docstrings,
comments and layout left out since session 41), so that answers of another rule are never mixed into one
table. Any edit of that code (a new option that is off by default included) would then strand every
stored answer, hours of CPU each page. This answers the
first batch of each ``--jobs`` job again with the current code, exactly as ``cliper eval`` first did (same
prompts, batch and settings), and only where every answer equals the stored one writes the current
hash into the store's header; no answer is changed. Anything else in the signature that differs is
refused, and so is a guided job its classes are no longer guided as when it was answered. The whole
classifier's digest may differ where every answer records its own job's (``--reuse-from`` reads those):
the header keeps the old one, so the store is a source to take answers from, not a run to resume.

Since session 43 each answer of a prompted job records the request written into its prompts (``Job.request``,
a digest of the wording), and ``cliper eval`` takes no prompted answer that lacks it. Answers made before
then get it the same way: where a prompted job's first batch comes out the same under today's wording,
its request is written onto every answer of that job that lacks one (nothing else on the line changes).

    python benchmarks/resign_store.py docs --jobs 'expert|guidance|8' 'elementary+friendly|prompt+guidance|1,2'

Where the new code is meant to decode some jobs differently (a fix on the rows one option reaches), ``--drop``
takes those jobs' answers out of the store as it is re-signed, so that ``cliper eval --reuse-from`` answers
them again instead of lending answers the new code would not make.

Answers made before the engine recorded how each ended (``finish_reason``) leave a page's cut-off,
stopped-short and unfinished cells blank for their rows. ``--complete`` answers those again, in the batches
``cliper eval`` made them in (each job's prompts ``--batch-size`` at a time, in prompt order), in a store signed
for the current code, and writes the ending onto each one the current code answers the same, byte for byte; an
answer that comes out different is reported and left as it was.

    python benchmarks/resign_store.py docs --complete
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cliper_integrations.core.engine import CLIPerEngine
from cliper_integrations.core.models import EMBEDDED_SPEC
from cliper_integrations.evaluation.steering import (
    RESPONSES_FILE,
    EvalConfig,
    Job,
    generate,
    guidance_of,
    load_prompts,
    read_store,
    run_signature,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a `cliper eval` output folder")
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--jobs", nargs="+", help="job keys to answer again (as the store names them)")
    task.add_argument("--complete", action="store_true", help="record how each answer that lacks it ended")
    parser.add_argument(
        "--drop", nargs="*", default=[], help="job keys the new code answers differently: their answers are taken out"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="the run's --batch-size")
    parser.add_argument("--prompts-dir", type=Path, default=Path("../shared/data/eval"))
    parser.add_argument("--model", default=EMBEDDED_SPEC)
    parser.add_argument("--classifier", default="default", help="the classifier the store was answered with")
    args = parser.parse_args()

    path = args.folder / RESPONSES_FILE
    stored, records, broken = read_store(path)
    if broken:
        raise SystemExit(f"{path}: its last line is broken; let `cliper eval` mend it first")
    engine = CLIPerEngine(args.model, args.classifier, dtype=stored["dtype"])
    config = EvalConfig(
        args.prompts_dir / str(stored["prompts_file"]),
        args.folder,
        max_new_tokens=int(stored["max_new_tokens"]),
        batch_size=args.batch_size,
    )
    current = run_signature(engine, config)
    differs = {key for key in current.keys() | stored.keys() if current.get(key) != stored.get(key)}
    if "classifier" in differs and any("guidance" not in r for r in records):
        raise SystemExit(f"{path} holds answers that do not record their guidance; re-sign with --classifier as it was")
    if differs - {"classifier", "decoding_rule"}:
        raise SystemExit(f"{path} differs in more than the decoding rule's code: {sorted(differs)}")
    if args.complete:
        if args.drop:
            raise SystemExit("--drop goes with --jobs: --complete changes no answer")
        if differs:
            raise SystemExit(f"{path} is not signed for this code ({sorted(differs)} differ): re-sign it first")
        complete(path, records, engine, config)
        return
    jobs = [Job.from_key(key) for key in args.jobs]
    if vouching_and_dropped := set(args.jobs) & set(args.drop):
        raise SystemExit(f"{sorted(vouching_and_dropped)}: a job cannot vouch for the code and be dropped")
    if missing := set(args.drop) - {r["job"] for r in records}:
        raise SystemExit(f"{path} holds no answers of {sorted(missing)} to drop")
    unstamped = {job.key: job.request for job in jobs if job.request and any(unrequested(r, job) for r in records)}
    if "decoding_rule" not in differs and not unstamped:
        raise SystemExit(f"{path} is already signed for this code")
    answers = {(r["prompt_id"], r["job"]): r for r in records}
    batch = load_prompts(config.prompts_file, args.batch_size)
    same = True
    for job in jobs:
        stored_batch = [answers.get((pid, job.key)) for pid, _ in batch]
        if None in stored_batch:
            raise SystemExit(f"{path} lacks answers of {job.key} to the first {args.batch_size} prompts")
        if {r["guidance"] for r in stored_batch} != {guidance_of(engine, job)}:
            raise SystemExit(f"{job.key}: its classes are guided differently now; its answers cannot vouch for it")
        results = generate(engine, [prompt for _, prompt in batch], job, config)
        changed = [r["prompt_id"] for r, new in zip(stored_batch, results, strict=True) if new.text != r["response"]]
        print(f"{job.key}: {len(batch) - len(changed)} of {len(batch)} answers the same; different: {changed}")
        same = same and not changed
    if not same:
        raise SystemExit(f"{path} left as it was: the current code answers differently")
    header, *lines = path.read_text().splitlines()
    if "decoding_rule" in differs:
        written = json.loads(header)
        header = json.dumps({**written, "run": {**written["run"], "decoding_rule": current["decoding_rule"]}})
        print(f"{path}: decoding_rule {stored['decoding_rule']} -> {current['decoding_rule']}")
    kept = [line for line in lines if json.loads(line)["job"] not in args.drop]
    path.write_text("".join(f"{line}\n" for line in [header, *(stamped(line, unstamped) for line in kept)]))
    if args.drop:
        print(f"{path}: {len(lines) - len(kept)} answers of {', '.join(args.drop)} taken out")
    for key, request in unstamped.items():
        print(f"{key}: request {request} recorded on its answers")


def complete(path: Path, records: list[dict], engine: CLIPerEngine, config: EvalConfig) -> None:
    """Record ``finish_reason`` on every answer that lacks it and that the current code, answering its batch
    again as ``cliper eval`` first did, makes the same; the store's other lines stay byte for byte."""
    prompts = load_prompts(config.prompts_file, None)
    answers = {(r["prompt_id"], r["job"]): r for r in records}
    endings: dict[tuple[int, str], str] = {}
    for key in dict.fromkeys(r["job"] for r in records if "finish_reason" not in r):
        job = Job.from_key(key)
        if {r["guidance"] for r in records if r["job"] == key} != {guidance_of(engine, job)}:
            print(f"{key}: its classes are guided differently now; left as it was")
            continue
        answered = [(pid, prompt) for pid, prompt in prompts if (pid, key) in answers]
        batches = [answered[start : start + config.batch_size] for start in range(0, len(answered), config.batch_size)]
        for batch in batches:
            lacking = [pid for pid, _ in batch if "finish_reason" not in answers[pid, key]]
            if not lacking:
                continue
            results = generate(engine, [prompt for _, prompt in batch], job, config)
            made = {pid: result for (pid, _), result in zip(batch, results, strict=True)}
            same = [pid for pid in lacking if made[pid].text == answers[pid, key]["response"]]
            endings |= {(pid, key): made[pid].finish_reason for pid in same}
            different = sorted(set(lacking) - set(same))
            print(f"{key}, prompts {batch[0][0]}–{batch[-1][0]}: {len(same)} of {len(lacking)} the same; {different=}")
    header, *lines = path.read_text().splitlines()
    path.write_text("".join(f"{line}\n" for line in [header, *(ended(line, endings) for line in lines)]))
    print(f"{path}: finish_reason recorded on {len(endings)} answers")


def ended(line: str, endings: dict[tuple[int, str], str]) -> str:
    """A store's line with how its answer ended recorded after its response, where ``endings`` names it; any
    other line unchanged, byte for byte."""
    record = json.loads(line)
    if (ending := endings.get((record["prompt_id"], record["job"]))) is None:
        return line
    return inserted(record, "finish_reason", ending, after="response")


def unrequested(record: dict, job: Job) -> bool:
    """An answer of ``job`` made before answers recorded the request written into their prompts."""
    return record["job"] == job.key and "request" not in record


def stamped(line: str, requests: dict[str, str]) -> str:
    """A store's line with the request of its job recorded, after its guidance, where ``requests`` names the
    job and the answer does not record one; any other line unchanged, byte for byte."""
    record = json.loads(line)
    if record["job"] not in requests or "request" in record:
        return line
    return inserted(record, "request", requests[record["job"]], after="guidance")


def inserted(record: dict, key: str, value: object, after: str) -> str:
    """``record`` as a store line with ``key`` added after the field ``after`` (last where it has none)."""
    items = list(record.items())
    at = list(record).index(after) + 1 if after in record else len(items)
    return json.dumps(dict([*items[:at], (key, value), *items[at:]]), ensure_ascii=False)


if __name__ == "__main__":
    main()
