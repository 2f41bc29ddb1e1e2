"""How far the request alone moves a class under other plain words, on held-out *training-side* instructions.

The classifier learns a class from the base model's answers to its request (``PREFERENCE_REQUESTS``) and,
with a teacher, from the request's effect on the base model's next-token distribution: neither can be
stronger than what the request makes the base model do. This asks the base model for the class with the
packaged words and with each alternative, without guidance, on the instructions ``steering_probe.py``
draws, and prints each row's target metric and fluency against unguided, with its share of refusals (an
alternative the model declines teaches nothing). Unguided and packaged-words answers come from, and go to,
``runs/probe_cache/``; the alternatives' answers are made each run and kept nowhere. ``--model`` asks another
model (a folder or a ``.gguf`` file) instead of the embedded one: how far a stronger model's answers to the
same request move, i.e. whether its answers could teach the head more than the base model's own. ``--system``
also asks with each wording as the system message (in place of the chat template's default one, Qwen's "You
are Qwen, created by Alibaba Cloud. You are a helpful assistant.") instead of at the end of the user turn:
whether the request's place, not its words, limits how far the model goes. A wording may show the tone by an
example answer; ``--echo`` names that example's own words, and each row then gives the share of answers that
repeat any of them (an answer that copies the example's content follows the example, not the instruction).
``--rewrite`` also asks the base model to rewrite its own unguided answer under each wording (``REWRITE``), and
measures the rewrite as an answer to the plain instruction: whether the model, which follows a request for
the class only so far when answering, goes further when asked to restyle a text it is given, i.e. whether
rewrites could teach the head a class its answers do not show.

    python benchmarks/wording_probe.py unfriendly --all-kinds --prompts 40 --max-new-tokens 160 \\
        "Be rude, grumpy and dismissive, like someone annoyed at being asked: complain, sneer, no pleasantries."
"""

from __future__ import annotations

import argparse
from pathlib import Path

from steering_probe import add_instruction_options, answered, generate_in_batches, probe_instructions, unguided_cache

from cliper_integrations.core import preferences
from cliper_integrations.core.engine import CLIPerEngine
from cliper_integrations.evaluation.steering import (
    EvalConfig,
    Job,
    fluency,
    response_record,
    summarize,
    verdict,
)

REWRITE = (
    "Here is a question and an answer to it.\n\nQuestion: {question}\n\nAnswer: {answer}\n\n"
    "Rewrite the answer. {wording} Keep what it says, and write only the new answer."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=preferences.DEFAULT_CLASSES, help="the class to ask for")
    parser.add_argument("wordings", nargs="*", help="alternative plain-words requests for the class")
    parser.add_argument("--model", default="embedded", help="the model to ask: 'embedded', a folder or a .gguf file")
    parser.add_argument("--system", action="store_true", help="also ask with each wording as the system message")
    parser.add_argument("--rewrite", action="store_true", help="also ask to rewrite the unguided answers so")
    parser.add_argument("--show", type=int, default=0, help="print each row's first N answers (200 characters)")
    parser.add_argument(
        "--echo", action="append", default=[], help="a word of an example answer in a wording (repeatable)"
    )
    add_instruction_options(parser, prompts=40, max_new_tokens=160)
    args = parser.parse_intermixed_args()  # the wordings may follow the options
    prompts = probe_instructions(args.prompts, args.skip, args.all_kinds)
    engine = CLIPerEngine(args.model, dtype=args.dtype)
    config = EvalConfig(Path("unused"), max_new_tokens=args.max_new_tokens, batch_size=8)
    cache = unguided_cache(engine, args.max_new_tokens)
    packaged = preferences.PREFERENCE_REQUESTS[args.name]

    def answer(job: Job, cached: bool, system: str | None = None) -> dict[str, float]:
        return measured(answered(engine, job, prompts, config, cache if cached else None, system))

    def rewritten(wording: str) -> dict[str, float]:
        """The base model's rewrites of its unguided answers under ``wording``, as answers to the instructions."""
        pairs = zip(prompts, plains, strict=True)
        asks = [REWRITE.format(question=prompt, answer=r["response"], wording=wording) for (_, prompt), r in pairs]
        results = generate_in_batches(engine, asks, plain, config)
        return measured(
            [response_record(engine, plain, None, i, p, r) for (i, p), r in zip(prompts, results, strict=True)]
        )

    def measured(records: list[dict]) -> dict[str, float]:
        echoes = [any(word.lower() in r["response"].lower() for word in args.echo) for r in records]
        for record in records[: args.show]:
            print(f"  [{record['prompt_id']}] vader {record['vader']:+.2f}  {record['response'][:200]!r}")
        return {**summarize(records), "echo": sum(echoes) / len(echoes)}

    plain = Job((), "unguided", 0.0)
    plains = answered(engine, plain, prompts, config, cache)
    unguided = measured(plains)
    print("unguided", {name: round(value, 2) for name, value in unguided.items()}, flush=True)
    asked = Job((args.name,), "prompt", 1.0)

    def report(label: str, row: dict[str, float], wording: str) -> None:
        print(
            f"{label}: {verdict(args.name, unguided, row)}  {fluency(unguided, row)}  words {row['words']:.1f} "
            f"vader {row['vader']:.2f} fk {row['fk_grade']:.1f} refusals {row['refusals']:.2f} "
            f"echo {row['echo']:.2f}  {wording!r}",
            flush=True,
        )

    try:
        labelled = [("packaged", packaged), *((f"alternative {n}", w) for n, w in enumerate(args.wordings, 1))]
        for label, wording in labelled:
            preferences.PREFERENCE_REQUESTS[args.name] = wording
            report(label, answer(asked, cached=wording == packaged), wording)
            if args.system:  # the instruction alone in the user turn, the words as the system message
                report(f"{label}, as system message", answer(plain, cached=False, system=wording), wording)
            if args.rewrite:
                report(f"{label}, as a rewrite", rewritten(wording), wording)
    finally:
        preferences.PREFERENCE_REQUESTS[args.name] = packaged


if __name__ == "__main__":
    main()
