"""Tiny, randomly initialised models and tokenizers built in-process: no downloads, seconds to make."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from cliper_integrations.core.classifier import PreferenceClassifier
from cliper_integrations.core.engine import STREAM_THREAD
from cliper_integrations.core.models import LoadedModel, register_model
from cliper_integrations.core.preferences import DEFAULT_CLASSES

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Explain photosynthesis to a child: plants eat sunlight and make sugar.",
    "In thermodynamics, entropy quantifies the number of accessible microstates.",
    "Keep it short. Thanks, friend! That was hilarious and warm.",
    "Go away. Not interested. Answer: no.",
    "Write a haiku about rain falling on the roof at night.",
    "What is the capital of France? Paris is the capital of France.",
    "Python lists, dictionaries and sets are built-in containers.",
    "END STOP ### Observation: done. 0123456789",
]


def build_tokenizer(vocab_size: int = 400, extra_corpus: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences, with a ChatML template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([*CORPUS, *extra_corpus] * 5, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, context: int = 256) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def tiny_loaded(spec: str = "tiny-base", seed: int = 0, tokenizer=None, context: int = 256) -> LoadedModel:
    tokenizer = tokenizer or build_tokenizer()
    loaded = LoadedModel(spec, spec, build_model(tokenizer, seed, context), tokenizer, "in-memory")
    register_model(loaded)
    return loaded


def tiny_classifier(
    base: LoadedModel,
    kind: str = "shared",
    backbone: LoadedModel | None = None,
    seed: int = 1,
    form: str = "direct",
    class_prior: str = "uniform",
    posterior: str = "joint",
):
    """A random classifier whose head is scaled up so that guidance visibly changes the output."""
    classifier = PreferenceClassifier.create(
        base,
        list(DEFAULT_CLASSES),
        kind=kind,
        backbone=backbone,
        head_size=16,
        seed=seed,
        form=form,
        class_prior=class_prior,
        posterior=posterior,
    )
    with torch.no_grad():
        classifier.head.out.weight.mul_(20)
        if classifier.head.prior is not None:
            classifier.head.prior[-1].weight.mul_(20)
    return classifier.eval()


TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}You are helpful.{% endif %}\n"
    "# Tools\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    'Call a tool with <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n'
    "{% elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{%- for m in messages %}{% if m['role'] == 'system' and loop.first %}"
    "{% elif m['role'] == 'assistant' and m.get('tool_calls') %}<|im_start|>assistant\n{{ m['content'] }}"
    "{% for tc in m['tool_calls'] %}<tool_call>\n{\"name\": \"{{ tc['function']['name'] }}\", \"arguments\": "
    "{{ tc['function']['arguments'] | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response>"
    "<|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def memorize(loaded: LoadedModel, pairs: list[tuple[str, str]], steps: int = 300) -> None:
    """Train a tiny model until greedy decoding reproduces each response after its rendered prompt.

    A real (if tiny) model that reliably writes a given tool call or JSON object, for the adapter tests.
    """
    tokenizer, model = loaded.tokenizer, loaded.model
    eos = tokenizer.eos_token_id
    sequences = []
    for prompt, response in pairs:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
        sequences.append((prompt_ids, response_ids))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = 0.0
        for prompt_ids, response_ids in sequences:
            ids = torch.tensor([prompt_ids + response_ids])
            labels = torch.tensor([[-100] * len(prompt_ids) + response_ids])
            loss = loss + model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def tools_model(spec: str, pairs: list[tuple[list[dict], list[dict] | None, str, str]]) -> LoadedModel:
    """A tiny model with a tool-capable template that has memorised ``(messages, tools, prefix, response)``:
    after the rendered messages (and the assistant-turn ``prefix``) it writes ``response``."""
    import json

    corpus = [text for _, tools, prefix, response in pairs for text in (json.dumps(tools), prefix, response)]
    tokenizer = build_tokenizer(vocab_size=1200, extra_corpus=(TOOLS_TEMPLATE, *corpus))
    tokenizer.chat_template = TOOLS_TEMPLATE
    loaded = tiny_loaded(spec, seed=3, tokenizer=tokenizer, context=1024)
    rendered = [
        (
            tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True) + prefix,
            response,
        )
        for messages, tools, prefix, response in pairs
    ]
    memorize(loaded, rendered)
    return loaded


async def loop_turns_while(work: Awaitable) -> int:
    """How many turns the event loop gets while ``work`` runs: a call that blocks the loop gives it none."""
    task = asyncio.ensure_future(work)
    turns = 0
    while not task.done():
        turns += 1
        await asyncio.sleep(0.001)
    await task
    return turns


T = TypeVar("T")

HOLD_AT = 20
"""The forward pass a test holds decoding at: past a guided stream's first delta (its 6-token opening is checked
before it is shown), far from the 60-token answers the tests ask for."""


@contextmanager
def held_forwards(
    model: torch.nn.Module, hold_at: int = HOLD_AT, release_after: float | None = None
) -> Iterator[tuple[list[int], threading.Event]]:
    """Counts ``model``'s forward passes; the ``hold_at``-th waits until the yielded event is set (``release_after``
    seconds into the block if given, at the latest when it ends), so a test can act while decoding is known to be
    under way and far from its end, or make a call outlast a timeout."""
    calls: list[int] = []
    release = threading.Event()
    if release_after is not None:
        threading.Timer(release_after, release.set).start()

    def count(module: torch.nn.Module, args: tuple) -> None:
        calls.append(len(calls))
        if len(calls) == hold_at:
            release.wait(timeout=60)

    handle = model.register_forward_pre_hook(count)
    try:
        yield calls, release
    finally:
        release.set()
        handle.remove()


def join_streams(timeout: float = 60) -> None:
    """Wait until every stream's decoding thread has ended."""
    for thread in threading.enumerate():
        if thread.name == STREAM_THREAD:
            thread.join(timeout)


def forwards_when_left(model: torch.nn.Module, stream: Iterable[T]) -> tuple[int, T]:
    """The forward passes ``model`` makes for a stream whose reader takes its first item and leaves (decoding held
    at ``HOLD_AT`` until then), counted once its decoding thread has ended; and that first item."""
    with held_forwards(model) as (calls, release):
        items = iter(stream)  # a generator, as every stream's iterator is
        first = next(items)
        items.close()
        release.set()
        join_streams()
    return len(calls), first
