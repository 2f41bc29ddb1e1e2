"""What ``ChatCLIPer`` and ``CLIPerLLM`` share beyond the core settings: LangChain's standard
parameters, the run config's ``user_id``, token counting by the model's own tokenizer, and LangSmith parameters."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.runnables import RunnableConfig, ensure_config
from pydantic import SecretStr
from typing_extensions import Self

from cliper_integrations.core.engine import CLIPerEngine, GenerationRequest, stored_weights
from cliper_integrations.core.memory import as_memory
from cliper_integrations.core.settings import GenerationSettings

# Keyword arguments LangChain itself adds to calls; they carry no generation setting for us.
_LANGCHAIN_KWARGS = {"ls_structured_output_format", "run_name", "run_id"}

# Settings that change an answer (``memory`` enters the cache key through the preferences it stores for the user;
# ``batch_window`` changes no answer, and a call past its ``timeout`` has none to cache).
_ANSWER_SETTINGS = frozenset(GenerationSettings.model_fields) - {"memory", "batch_window", "timeout"}


def user_from_config(config: RunnableConfig | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's keywords with the run config's user (``configurable.user_id``, else ``metadata.user_id``) as its
    ``user_id``, so that the user reaches the request and LangChain's cache key; an explicit keyword wins."""
    config = ensure_config(config)
    user_id = config.get("configurable", {}).get("user_id") or config.get("metadata", {}).get("user_id")
    return {"user_id": user_id, **kwargs} if user_id is not None else kwargs


class CLIPerParams(GenerationSettings):
    """Core settings plus LangChain's standard parameters."""

    streaming: bool = False
    max_retries: int | None = None
    """Accepted for LangChain's standard parameters; local generation is not retried."""
    api_key: SecretStr | None = None
    """Accepted for LangChain's standard parameters; a local model needs no key."""

    @property
    def _identifying_params(self) -> dict[str, Any]:
        """Every setting that changes an answer, and the weights stored for the default user. LangChain keys its LLM
        cache (``set_llm_cache``) on these, so objects with other settings, and a user before and after a change of
        preferences, never share a cached answer."""
        memory = as_memory(self.memory)
        stored = stored_weights(memory, self.user_id) if memory is not None and self.user_id is not None else None
        return {**self.model_dump(include=_ANSWER_SETTINGS), "stored_weights": stored}

    def with_call_settings(self, kwargs: dict[str, Any]) -> Self:
        """A copy whose fields carry the call's settings (``user_id``, ``weights``, ``temperature``, …), for
        LangChain's cache key: a chat model's holds the call's keywords but not the weights stored for the user they
        name, and a ``BaseLLM``'s holds fields only."""
        settings = {name: kwargs[name] for name in _ANSWER_SETTINGS & kwargs.keys()}
        if "max_new_tokens" in kwargs:
            settings.setdefault("max_tokens", kwargs["max_new_tokens"])
        return self.model_copy(update=settings) if settings else self

    def in_flight(self, configs: list[RunnableConfig], kwargs: dict[str, Any]) -> list[RunnableConfig]:
        """``configs`` letting as many inputs be in flight at once as the engine batches (``max_batch_size``), unless
        they set ``max_concurrency``: LangChain's ``batch`` runs one ``invoke`` per input in a thread pool, the engine
        decodes the calls that arrive together as one batch, and the executor's default (CPU cores + 4 threads)
        would split it."""
        if not configs or configs[0].get("max_concurrency") is not None:
            return configs
        in_one_batch = self.engine_for(dict(kwargs)).max_batch_size
        return [{**configs[0], "max_concurrency": min(len(configs), in_one_batch)}, *configs[1:]]

    # The run config's user becomes the call's ``user_id`` (an explicit keyword wins).
    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return super().invoke(input, config, **user_from_config(config, kwargs))

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return await super().ainvoke(input, config, **user_from_config(config, kwargs))

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        return super().stream(input, config, **user_from_config(config, kwargs))

    def astream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AsyncIterator[Any]:
        return super().astream(input, config, **user_from_config(config, kwargs))

    def get_token_ids(self, text: str) -> list[int]:
        """``text`` in the model's own tokens (``custom_get_token_ids`` still wins). LangChain's fallback loads
        GPT-2's tokenizer from the Hugging Face Hub, which fails offline and counts another model's tokens."""
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        return self.engine.token_ids(text)

    def lc_request(
        self, prompt: Any, stop: list[str] | None, kwargs: dict[str, Any], **extra: Any
    ) -> tuple[CLIPerEngine, GenerationRequest]:
        """The engine and core request for one LangChain call."""
        options = {key: value for key, value in kwargs.items() if key not in _LANGCHAIN_KWARGS}
        engine = self.engine_for(options)
        return engine, self.build_request(prompt, stop, options, **extra)

    def ls_params(self, model_type: str, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {
            "ls_provider": "cliper",
            "ls_model_name": kwargs.get("model") or self.model,
            "ls_model_type": model_type,
            "ls_temperature": self.temperature,
            "ls_max_tokens": self.max_tokens,
            "ls_stop": stop or self.stop,
        }
