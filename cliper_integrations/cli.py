"""The ``cliper`` command line: generate, bench, info, and data generation."""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Annotated

import typer

from cliper_integrations.core.errors import CLIPerError, InvalidRequestError
from cliper_integrations.core.models import EMBEDDED_SPEC, cache_dir
from cliper_integrations.core.preferences import DEFAULT_CLASSES, parse_weights

app = typer.Typer(help="Classifier-guided personalization of a local LLM (CLIPer).", no_args_is_help=True)
data_app = typer.Typer(help="Build the classifier's training data.", no_args_is_help=True)
memory_app = typer.Typer(help="Per-user preference memory.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(memory_app, name="memory")

ModelOption = Annotated[str, typer.Option("--model", help="embedded, a Hugging Face id, a folder or a .gguf file")]
ClassifierOption = Annotated[
    str, typer.Option("--classifier", help="'default' (packaged for the model), 'none', or a classifier folder")
]
DTypeOption = Annotated[
    str,
    typer.Option("--dtype", help="float32, bfloat16 (2.2× faster on an AVX512-BF16 CPU; docs/performance.md), float16"),
]


def _engine(model: str, classifier: str, dtype: str = "float32"):
    from cliper_integrations.core.engine import CLIPerEngine

    return CLIPerEngine(model, classifier=None if classifier == "none" else classifier, dtype=dtype)


def _fail(error: Exception) -> typer.Exit:
    typer.secho(f"Error ({type(error).__name__}): {error}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


def _record_prompt(record: dict) -> str:
    """An input line's prompt; an unusable line becomes an empty prompt, refused on its own row."""
    from cliper_integrations.core.prompting import instruction_text

    try:
        return instruction_text(record)
    except CLIPerError:
        return ""


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Option(help="the prompt")] = None,
    input: Annotated[Path | None, typer.Option("--input", help="JSONL: 'prompt' or 'instruction' (+ 'input')")] = None,
    model: ModelOption = EMBEDDED_SPEC,
    classifier: ClassifierOption = "default",
    dtype: DTypeOption = "float32",
    weights: Annotated[
        list[str] | None, typer.Option(help="NAME=ALPHA,...; repeat to answer once per weight set")
    ] = None,
    user: Annotated[str | None, typer.Option(help="take weights from this user's stored preferences")] = None,
    db: Annotated[str | None, typer.Option(help="memory database URL (default: SQLite in the cache folder)")] = None,
    no_guidance: Annotated[bool, typer.Option("--no-guidance", help="decode without the classifier")] = False,
    preference_prompt: Annotated[
        bool, typer.Option("--preference-prompt", help="also write the preferences into the prompt")
    ] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: int | None = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per answer")] = False,
) -> None:
    """Answer prompts, guided by the given weights or by a user's stored preferences."""
    from cliper_integrations.core.engine import GenerationRequest

    if (prompt is None) == (input is None):
        raise _fail(typer.BadParameter("give exactly one of --prompt and --input"))
    try:
        prompts = (
            [prompt]
            if prompt is not None
            else [_record_prompt(json.loads(line)) for line in input.read_text().splitlines() if line.strip()]
        )
        weight_sets = [parse_weights(text) for text in weights] if weights else [None]
        engine = _engine(model, classifier, dtype)
        if user is not None:
            engine.memory = _memory(db)
    except (CLIPerError, OSError, json.JSONDecodeError) as error:
        raise _fail(error) from error
    requests = [
        GenerationRequest(
            text,
            weights=weight_set,
            user_id=user,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            guidance=not no_guidance,
            preference_prompt=preference_prompt,
        )
        for text in prompts
        for weight_set in weight_sets
    ]
    failed = False
    for request, result in zip(requests, engine.generate_batch(requests), strict=True):
        failed |= result.error is not None
        if as_json:
            record = {
                "prompt": request.prompt,
                "response": result.text,
                "new_tokens": result.completion_tokens,
                "seconds": round(result.seconds, 3),
                "weights": result.weights,
                "weights_source": result.weights_source,
                "warnings": result.warnings,
            }
            if result.error is not None:
                record["error"] = f"{type(result.error).__name__}: {result.error}"
            typer.echo(json.dumps(record, ensure_ascii=False))
        elif result.error is not None:
            typer.secho(f"Error ({type(result.error).__name__}): {result.error}", fg=typer.colors.RED, err=True)
        else:
            guided = ", ".join(f"{k}={v:g}" for k, v in result.weights.items())
            asked = ", ".join(f"{k}={v:g}" for k, v in (request.weights or {}).items())
            shown = f"guided: {guided}" if guided else "unguided"
            if guided and result.weights_source != "explicit":
                shown += f" (from {result.weights_source})"
            if request.preference_prompt and asked:
                shown += f"; in the prompt: {asked}"
            typer.secho(f"### {request.prompt}  [{shown}]", bold=True)
            for warning in result.warnings:
                typer.secho(f"Warning: {warning}", fg=typer.colors.YELLOW, err=True)
            typer.echo(result.text + "\n")
    if failed:
        raise typer.Exit(code=1)


@app.command()
def bench(
    model: ModelOption = EMBEDDED_SPEC,
    classifier: ClassifierOption = "default",
    dtype: DTypeOption = "float32",
    max_new_tokens: int = 64,
    repeats: int = 3,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Tokens/s unguided vs guided, and the speed-up of 8 differently weighted requests in one batch."""
    from cliper_integrations.evaluation.bench import run_bench

    try:
        result = run_bench(_engine(model, classifier, dtype), max_new_tokens=max_new_tokens, repeats=repeats)
    except CLIPerError as error:
        raise _fail(error) from error
    if as_json:
        typer.echo(json.dumps(result.as_dict()))
        return
    for key, value in result.as_dict().items():
        typer.echo(f"{key:>20}: {value}")


@app.command()
def info(model: ModelOption = EMBEDDED_SPEC, classifier: ClassifierOption = "default") -> None:
    """Versions, the resolved model and classifier, and the cache folder."""
    import torch
    import transformers

    typer.echo(
        f"cliper-integrations {version('cliper-integrations')}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, Python {sys.version.split()[0]}"
    )
    typer.echo(f"cache folder: {cache_dir()}")
    try:
        engine = _engine(model, classifier)
    except CLIPerError as error:
        raise _fail(error) from error
    loaded = engine.loaded
    typer.echo(f"model: {model} -> {loaded.name} ({loaded.source}), context window {loaded.context_window}")
    if engine.classifier is None:
        typer.echo("classifier: none (guidance unavailable; see `cliper train`)")
    else:
        config = engine.classifier.config
        typer.echo(
            f"classifier: {config.kind} backbone, {config.form} form, {config.posterior} posterior, "
            f"classes {', '.join(config.classes)}, trained for {config.base_model}"
        )


@app.command()
def train(
    data: Annotated[
        list[Path] | None, typer.Option(help="JSONL written by `cliper data generate` (repeat for several)")
    ] = None,
    output: Annotated[Path, typer.Option(help="folder for classifier.safetensors, .json, metrics.json")] = Path(
        "runs/classifier"
    ),
    model: ModelOption = EMBEDDED_SPEC,
    backbone: Annotated[str | None, typer.Option(help="model spec of a separate backbone (default: shared)")] = None,
    epochs: int = 40,
    learning_rate: float = 2e-3,
    weight_decay: float = 0.05,
    dropout: float = 0.2,
    patience: int = 4,
    head_size: int = 256,
    shift_rank: Annotated[
        int, typer.Option(help="rank of the head's bilinear term (how the prefix shifts each candidate; 0: none)")
    ] = 0,
    val_fraction: float = 0.15,
    seed: int = 0,
    feature_cache: Annotated[
        Path | None, typer.Option(help="folder to keep encoded backbone features in, for later runs")
    ] = Path("runs/features"),
    contrast_filter: Annotated[
        bool, typer.Option(help="keep only answers whose text shows their class against the opposite pole")
    ] = True,
    pole_limit: Annotated[
        list[str] | None,
        typer.Option(
            help="CLASS=BOUND: training answers of the class must also measure at most (at least, for the pole "
            "measured higher) this on their axis, e.g. unfriendly=0 (VADER); repeat for several"
        ),
    ] = None,
    form: Annotated[
        str, typer.Option(help="bayes (scores candidates against the base model; shared backbone) or direct")
    ] = "bayes",
    generative_weight: Annotated[float, typer.Option(help="bayes form: weight of the next-token loss")] = 0.5,
    class_prior: Annotated[
        str, typer.Option(help="bayes form: uniform, or learned (a second small head's p(class | prefix))")
    ] = "uniform",
    posterior: Annotated[
        str,
        typer.Option(
            help="joint (each class against all), axis (against its own axis's other pole), part (against the "
            "classes of its own head part, with --part) or main-joint (so for the parts' classes; the main head's "
            "classes against all of its own rows, guiding exactly as it alone does)"
        ),
    ] = "joint",
    response_weight: Annotated[
        float, typer.Option(help="weight of the response-level term (class of a whole response from its tokens)")
    ] = 0.0,
    prior_on: Annotated[
        Path | None,
        typer.Option(
            help="fit only a learned class prior on top of this trained bayes classifier's head (kept frozen); "
            "'default': the packaged one's, whose reading prior is then fitted again"
        ),
    ] = None,
    part: Annotated[
        list[str] | None,
        typer.Option(
            help="with --prior-on: CLASSES=FOLDER scores those comma-separated classes by that trained classifier's "
            "head instead (repeat for several), e.g. friendly,unfriendly=runs/tone"
        ),
    ] = None,
    main_guided: Annotated[
        str,
        typer.Option(
            help="with --prior-on and --posterior main-joint: comma-separated parts' classes that keep the main "
            "head's posterior, e.g. elementary with --part elementary,expert=runs/expertise (a head for expert alone)"
        ),
    ] = "",
    prior_from: Annotated[
        Path | None,
        typer.Option(
            help="with --prior-on: start the reading prior from this classifier's ('default': the packaged one's); "
            "with --epochs 0 it is kept as it is"
        ),
    ] = None,
    guidance_prior: Annotated[
        str, typer.Option(help="with a learned prior: learned (decoding uses it too) or uniform (reading only)")
    ] = "learned",
    prior_layer: Annotated[
        int | None,
        typer.Option(help="with --guidance-prior uniform: the backbone layer the learned prior reads (default: last)"),
    ] = None,
    prior_pooling: Annotated[
        str,
        typer.Option(
            help="with --prior-layer: what the prior reads at a position, last (its state) or mean (the answer's "
            "mean state up to it)"
        ),
    ] = "last",
    teacher: Annotated[
        str,
        typer.Option(
            help="comma-separated classes whose candidate distribution is also taught by the base model asked for "
            "the class in the prompt (bayes form), e.g. friendly,unfriendly"
        ),
    ] = "",
    teacher_weight: Annotated[float, typer.Option(help="weight of the teacher term")] = 1.0,
    teacher_answers: Annotated[
        str, typer.Option(help="answers the teacher reads: axis (those on the teacher classes' axes) or all")
    ] = "axis",
) -> None:
    """Train a preference classifier (token-level cross-entropy, split by instruction, early stopping)."""
    from cliper_integrations.core.models import load_model
    from cliper_integrations.training.trainer import TrainConfig, train_classifier

    try:
        config = TrainConfig(
            data=data or [Path("data/train_generations.jsonl")],
            output=output,
            epochs=epochs,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            dropout=dropout,
            patience=patience,
            head_size=head_size,
            shift_rank=shift_rank,
            val_fraction=val_fraction,
            seed=seed,
            feature_cache=feature_cache,
            contrast_filter=contrast_filter,
            pole_limits=dict(_pole_limit(spec) for spec in pole_limit or []),
            form=form,
            generative_weight=generative_weight,
            class_prior=class_prior,
            posterior=posterior,
            response_weight=response_weight,
            prior_on=prior_on,
            head_parts_from=[_head_part(spec) for spec in part or []],
            main_guided_classes=tuple(name.strip() for name in main_guided.split(",") if name.strip()),
            prior_from=prior_from,
            guidance_prior=guidance_prior,
            prior_layer=prior_layer,
            prior_pooling=prior_pooling,
            teacher_classes=tuple(name for name in teacher.split(",") if name),
            teacher_weight=teacher_weight,
            teacher_answers=teacher_answers,
        )
        metrics = train_classifier(load_model(model), config, load_model(backbone) if backbone else None)
    except (CLIPerError, OSError, ValueError) as error:
        raise _fail(error) from error
    reports = [("validation", metrics["validation"]), *metrics["validation_by_model"].items()]
    if contrast_filter:
        reports.append(("validation, unfiltered", metrics["validation_unfiltered"]))
    for name, validation in reports:
        typer.echo(
            f"{name}: token accuracy {validation['token_accuracy']:.3f}, "
            f"response accuracy {validation['response_accuracy']:.3f}"
        )
        for axis, values in validation["axes"].items():
            typer.echo(f"  {axis:>9}: token {values['token_accuracy']:.3f}, response {values['response_accuracy']:.3f}")
    typer.echo(f"saved to {output}")


def _pole_limit(spec: str) -> tuple[str, float]:
    from cliper_integrations.training.data import parse_pole_limit

    try:
        return parse_pole_limit(spec)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None


def _head_part(spec: str) -> tuple[list[str], Path]:
    """``friendly,unfriendly=runs/tone`` -> (["friendly", "unfriendly"], Path("runs/tone"))."""
    names, separator, folder = spec.partition("=")
    if not separator or not folder or not names:
        raise typer.BadParameter(f"--part takes CLASSES=FOLDER, got {spec!r}")
    return [name.strip() for name in names.split(",") if name.strip()], Path(folder)


def _per_class_alphas(option: str, spec: str | None, measured: tuple[str, ...]) -> dict[str, float] | None:
    """``NAME=A,NAME=A`` of ``option``, each a measured class; None when the option is not given."""
    from cliper_integrations.core.preferences import parse_weights

    if spec is None:
        return None
    alphas = parse_weights(spec)
    if unmeasured := sorted(set(alphas) - set(measured)):
        raise InvalidRequestError(f"{option} names {', '.join(unmeasured)}, which --classes leaves out")
    return alphas


@app.command("eval")
def evaluate(
    prompts: Annotated[Path, typer.Option(help="evaluation prompts (JSON list of {id, prompt})")] = Path(
        "../shared/data/eval/alpaca_test100.json"
    ),
    output: Annotated[Path, typer.Option(help="folder for results.md, results.json and the plot")] = Path("docs"),
    limit: Annotated[int | None, typer.Option(help="only the first N prompts (a quick check)")] = None,
    alpha: float = 8.0,
    guided_alpha: Annotated[
        str | None,
        typer.Option(
            help="α for guidance alone per class, NAME=A,NAME=A (classes not named: --alpha); default: --alpha "
            "scaled as memory's weights are without the prompt (the classifier's unprompted_weight_factors)"
        ),
    ] = None,
    prompted_alpha: Annotated[
        str | None,
        typer.Option(
            help="α for prompting plus guidance per class, NAME=A,NAME=A (classes not named: --alpha); "
            "default: --alpha eased as memory's weights are with the prompt (the classifier's prompted_weight_factors)"
        ),
    ] = None,
    max_new_tokens: int = 160,
    batch_size: Annotated[
        int,
        typer.Option(help="answers decoded together (settings share a batch where one has fewer prompts)"),
    ] = 8,
    sweep: Annotated[
        bool, typer.Option(help="also guide at α = 2, 4, 16 for the α plot (skip for a quick check)")
    ] = True,
    sweep_limit: Annotated[
        int | None, typer.Option(min=1, help="run the sweep's other α values on the first N prompts only")
    ] = None,
    restart: Annotated[
        bool, typer.Option(help="discard the responses stored in the output folder instead of resuming from them")
    ] = False,
    classes: Annotated[
        str | None, typer.Option(help="comma-separated classes to measure (and the combinations among them)")
    ] = None,
    reuse_from: Annotated[
        list[Path] | None,
        typer.Option(
            help="another run's output folder: take the answers this run would make alike instead of answering "
            "them again (unguided and prompting-only ones, and guided ones of classes this classifier guides "
            "exactly as each answer records it was guided); repeat it to take from several, the first named "
            "first"
        ),
    ] = None,
    model: ModelOption = EMBEDDED_SPEC,
    classifier: ClassifierOption = "default",
    dtype: DTypeOption = "float32",
) -> None:
    """Measure steering: four settings per class, combinations and an α sweep; writes a report.

    Every response is stored (results_responses.jsonl) as it is made: rerunning the same command resumes,
    and a larger --limit only answers the new prompts."""
    from cliper_integrations.core.preferences import canonical_class
    from cliper_integrations.evaluation.steering import EvalConfig, run_eval

    try:
        measured = tuple(canonical_class(name) for name in classes.split(",")) if classes else EvalConfig.classes
        options = ((False, "--guided-alpha", guided_alpha), (True, "--prompted-alpha", prompted_alpha))
        given = {prompted: _per_class_alphas(option, spec, measured) for prompted, option, spec in options}
        engine = _engine(model, classifier, dtype)
        if engine.classifier is None:
            raise _fail(CLIPerError("cliper eval needs a classifier (train one with `cliper train`)"))
        guided_alphas, prompted_alphas = (
            alphas if alphas is not None else engine.scaled_for_setting(dict.fromkeys(measured, alpha), prompted)
            for prompted, alphas in given.items()
        )
        results = run_eval(
            engine,
            EvalConfig(
                prompts,
                output,
                limit,
                alpha,
                guided_alphas,
                prompted_alphas,
                sweep=EvalConfig.sweep if sweep else (),
                sweep_limit=sweep_limit,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                classes=measured,
                restart=restart,
                reuse_from=tuple(reuse_from or ()),
            ),
        )
    except (CLIPerError, OSError) as error:
        raise _fail(error) from error
    typer.echo(f"{results['prompts']} prompts; report written to {output / 'results.md'}")


@data_app.command("generate")
def data_generate(
    output: Annotated[Path, typer.Option(help="JSONL to append to")] = Path("data/train_generations.jsonl"),
    instructions: Path = Path("../shared/data/instructions/alpaca_train.jsonl"),
    num_instructions: int = 300,
    classes: Annotated[
        str,
        typer.Option(
            help="comma-separated classes; 'unrequested' answers with no request at all (read by a teacher only)"
        ),
    ] = ",".join(DEFAULT_CLASSES),
    max_new_tokens: int = 160,
    batch_size: int = 16,
    temperature: float = 0.7,
    seed: int = 0,
    samples: Annotated[int, typer.Option(min=1, help="answers per (instruction, class), each seeded apart")] = 1,
    model: ModelOption = EMBEDDED_SPEC,
) -> None:
    """Ask the base model for every class in plain words (batched, seeded, resumable)."""
    from cliper_integrations.core.preferences import TRAINABLE_CLASSES, UNREQUESTED, canonical_class
    from cliper_integrations.training.data import DataGenerationConfig, generate_dataset

    if "eval" in instructions.parts:
        raise _fail(ValueError("evaluation sets are for measuring only, never for training data"))
    try:
        config = DataGenerationConfig(
            instructions=instructions,
            output=output,
            num_instructions=num_instructions,
            classes=tuple(canonical_class(name, (*TRAINABLE_CLASSES, UNREQUESTED)) for name in classes.split(",")),
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            temperature=temperature,
            seed=seed,
            samples=samples,
        )
        counts = generate_dataset(_engine(model, "none"), config)
    except CLIPerError as error:
        raise _fail(error) from error
    typer.echo(json.dumps(dict(counts)))


DbOption = Annotated[str | None, typer.Option("--db", help="database URL (default: SQLite in the cache folder)")]


def _memory(db: str | None):
    from cliper_integrations.core.memory import PreferenceMemory

    return PreferenceMemory(db)


def _print_json(data) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _memory_call(call):
    try:
        return call()
    except CLIPerError as error:
        raise _fail(error) from error


@memory_app.command("show")
def memory_show(user: str, db: DbOption = None) -> None:
    """The user's profile and the weights it gives."""
    memory = _memory(db)
    profile = _memory_call(lambda: memory.get(user))
    _print_json(
        {"user_id": user, "known": memory.known(user), "profile": profile.model_dump(), "weights": profile.weights()}
    )


@memory_app.command("set")
def memory_set(
    user: str,
    strengths: Annotated[str, typer.Argument(help="CLASS=STRENGTH,... with strengths in [0, 1]")] = "",
    scale: float | None = None,
    cap: float | None = None,
    db: DbOption = None,
) -> None:
    """Change part of the profile; setting a pole clears its opposite."""
    partial: dict = {}
    for item in filter(None, (part.strip() for part in strengths.split(","))):
        name, _, value = item.partition("=")
        try:
            partial[name.strip()] = float(value)
        except ValueError:
            raise _fail(ValueError(f"Expected CLASS=STRENGTH, got {item!r}")) from None
    partial.update({k: v for k, v in (("scale", scale), ("cap", cap)) if v is not None})
    memory = _memory(db)
    profile = _memory_call(lambda: memory.set(user, partial, reason="cli"))
    _print_json({"profile": profile.model_dump(), "weights": profile.weights()})


@memory_app.command("learn")
def memory_learn(
    user: str,
    text: str,
    db: DbOption = None,
    embedding: Annotated[bool, typer.Option(help="use the offline embedding model")] = False,
) -> None:
    """Read preferences stated in plain words ("keep it short", "I'm a cardiologist")."""
    from cliper_integrations.core.memory import PreferenceMemory

    memory = PreferenceMemory(db, learner="embedding" if embedding else "keywords")
    _print_json({"changed": _memory_call(lambda: memory.learn_from_text(user, text)), "weights": memory.weights(user)})


@memory_app.command("feedback")
def memory_feedback(
    user: str,
    response: Annotated[str, typer.Option(help="the response being rated")],
    rating: Annotated[str, typer.Option(help="up, down, or a number in [-1, 1]")],
    style: Annotated[str | None, typer.Option(help="CLASS=P,... measured style; default: measure it")] = None,
    model: ModelOption = EMBEDDED_SPEC,
    classifier: ClassifierOption = "default",
    db: DbOption = None,
) -> None:
    """Move the profile towards (up) or away from (down) the style of a response."""
    memory = _memory(db)
    try:
        value: float | str = float(rating)
    except ValueError:
        value = rating
    measured = None
    if style is not None:
        measured = {k.strip(): float(v) for k, _, v in (p.partition("=") for p in style.split(",") if p.strip())}
    else:
        memory.style_measure = _memory_call(lambda: _engine(model, classifier)).measure_style
    profile = _memory_call(lambda: memory.record_feedback(user, response, value, style=measured))
    _print_json({"profile": profile.model_dump(), "weights": profile.weights()})


@memory_app.command("history")
def memory_history(user: str, db: DbOption = None) -> None:
    """Every change to the user's profile: when, what and why."""
    memory = _memory(db)
    _print_json(_memory_call(lambda: memory.history(user)))


@memory_app.command("export")
def memory_export(user: str, db: DbOption = None) -> None:
    """Everything stored about the user, as JSON."""
    memory = _memory(db)
    _print_json(_memory_call(lambda: memory.export(user)))


@memory_app.command("forget")
def memory_forget(user: str, db: DbOption = None) -> None:
    """Delete every row stored for the user."""
    memory = _memory(db)
    _print_json({"user_id": user, "rows_deleted": _memory_call(lambda: memory.forget(user))})
