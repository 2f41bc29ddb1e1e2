"""Re-sign a ``cliper eval`` store for a new version of the decoding rule's code, once that code is shown
to make the store's answers again, byte for byte.

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

    python benchmarks/resign_store.py docs --jobs 'expert|guidance|8' 'elementary+friendly|prompt+guidance|1,2'
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
    if not differs:
        raise SystemExit(f"{path} is already signed for this code")
    if "classifier" in differs and any("guidance" not in r for r in records):
        raise SystemExit(f"{path} holds answers that do not record their guidance; re-sign with --classifier as it was")
    if differs - {"classifier"} != {"decoding_rule"}:
        raise SystemExit(f"{path} differs in more than the decoding rule's code: {sorted(differs)}")
    answers = {(r["prompt_id"], r["job"]): r for r in records}
    batch = load_prompts(config.prompts_file, args.batch_size)
    same = True
    for key in args.jobs:
        job = Job.from_key(key)
        stored_batch = [answers.get((pid, key)) for pid, _ in batch]
        if None in stored_batch:
            raise SystemExit(f"{path} lacks answers of {key} to the first {args.batch_size} prompts")
        if {r["guidance"] for r in stored_batch} != {guidance_of(engine, job)}:
            raise SystemExit(f"{key}: its classes are guided differently now; its answers cannot vouch for the code")
        results = generate(engine, [prompt for _, prompt in batch], job, config)
        changed = [r["prompt_id"] for r, new in zip(stored_batch, results, strict=True) if new.text != r["response"]]
        print(f"{key}: {len(batch) - len(changed)} of {len(batch)} answers the same; different: {changed}")
        same = same and not changed
    if not same:
        raise SystemExit(f"{path} left as it was: the current code answers differently")
    header, rest = path.read_text().split("\n", 1)
    written = json.loads(header)
    signed = {**written, "run": {**written["run"], "decoding_rule": current["decoding_rule"]}}
    path.write_text(json.dumps(signed) + "\n" + rest)
    print(f"{path}: decoding_rule {stored['decoding_rule']} -> {current['decoding_rule']}")


if __name__ == "__main__":
    main()
