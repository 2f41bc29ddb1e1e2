"""What ``ChatCLIPer`` and ``CLIPerLLM`` share beyond the core settings: LangChain's standard
parameters, the run config's ``user_id``, token counting by the model's own tokenizer, and LangSmith parameters."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.runnables import RunnableConfig, ensure_config
from pydantic import SecretStr

from cliper_integrations.core.engine import CLIPerEngine, GenerationRequest
from cliper_integrations.core.settings import GenerationSettings

# Keyword arguments LangChain itself adds to calls; they carry no generation setting for us.
_LANGCHAIN_KWARGS = {"ls_structured_output_format", "run_name", "run_id"}

RunManager = CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None


def _user_from_config(config: RunnableConfig | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    user_id = ensure_config(config).get("configurable", {}).get("user_id")
    return {"user_id": user_id, **kwargs} if user_id is not None else kwargs


class CLIPerParams(GenerationSettings):
    """Core settings plus LangChain's standard parameters."""

    streaming: bool = False
    timeout: float | None = None
    """Accepted for LangChain's standard parameters; a local model has no request timeout."""
    max_retries: int | None = None
    """Accepted for LangChain's standard parameters; local generation is not retried."""
    api_key: SecretStr | None = None
    """Accepted for LangChain's standard parameters; a local model needs no key."""

    # The run config's ``configurable.user_id`` becomes the call's ``user_id`` (an explicit keyword wins).
    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return super().invoke(input, config, **_user_from_config(config, kwargs))

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return await super().ainvoke(input, config, **_user_from_config(config, kwargs))

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        return super().stream(input, config, **_user_from_config(config, kwargs))

    def astream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AsyncIterator[Any]:
        return super().astream(input, config, **_user_from_config(config, kwargs))

    def get_token_ids(self, text: str) -> list[int]:
        """``text`` in the model's own tokens (``custom_get_token_ids`` still wins). LangChain's fallback loads
        GPT-2's tokenizer from the Hugging Face Hub, which fails offline and counts another model's tokens."""
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        return self.engine.token_ids(text)

    def lc_request(
        self, prompt: Any, stop: list[str] | None, run_manager: RunManager, kwargs: dict[str, Any], **extra: Any
    ) -> tuple[CLIPerEngine, GenerationRequest]:
        """The engine and core request for one LangChain call (``user_id`` may also come from metadata)."""
        options = {key: value for key, value in kwargs.items() if key not in _LANGCHAIN_KWARGS}
        engine = self.engine_for(options)
        metadata = getattr(run_manager, "metadata", None) or {}
        return engine, self.build_request(prompt, stop, options, metadata.get("user_id"), **extra)

    def ls_params(self, model_type: str, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {
            "ls_provider": "cliper",
            "ls_model_name": kwargs.get("model") or self.model,
            "ls_model_type": model_type,
            "ls_temperature": self.temperature,
            "ls_max_tokens": self.max_tokens,
            "ls_stop": stop or self.stop,
        }
