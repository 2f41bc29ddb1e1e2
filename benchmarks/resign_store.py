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
    parser.add_argument("--jobs", nargs="+", required=True, help="job keys to answer again (as the store names them)")
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


def unrequested(record: dict, job: Job) -> bool:
    """An answer of ``job`` made before answers recorded the request written into their prompts."""
    return record["job"] == job.key and "request" not in record


def stamped(line: str, requests: dict[str, str]) -> str:
    """A store's line with the request of its job recorded, after its guidance, where ``requests`` names the
    job and the answer does not record one; any other line unchanged, byte for byte."""
    record = json.loads(line)
    if record["job"] not in requests or "request" in record:
        return line
    items = list(record.items())
    at = list(record).index("guidance") + 1 if "guidance" in record else len(items)
    return json.dumps(dict([*items[:at], ("request", requests[record["job"]]), *items[at:]]), ensure_ascii=False)


if __name__ == "__main__":
    main()
