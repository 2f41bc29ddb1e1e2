"""What ``ChatCLIPer`` and ``CLIPerLLM`` share: their fields and turning a call into a core request."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.runnables import RunnableConfig, ensure_config
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from cliper_integrations.core.engine import CLIPerEngine, GenerationRequest, GenerationResult, shared_engine
from cliper_integrations.core.errors import InvalidRequestError
from cliper_integrations.core.memory import PreferenceMemory, as_memory

# Keyword arguments LangChain itself adds to calls; they carry no generation setting for us.
_LANGCHAIN_KWARGS = {"ls_structured_output_format", "run_name", "run_id"}

RunManager = CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None


def _user_from_config(config: RunnableConfig | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    user_id = ensure_config(config).get("configurable", {}).get("user_id")
    return {"user_id": user_id, **kwargs} if user_id is not None else kwargs


class CLIPerParams(BaseModel):
    """Settings of a personalized local model; per-call keyword arguments override them."""

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True, protected_namespaces=())

    model: str = Field(default="embedded", alias="model_name")
    """``embedded``, a Hugging Face id, a local folder or a ``.gguf`` file."""
    classifier: str | None = "default"
    """``default`` (packaged for the model), a classifier folder, or None for no guidance."""
    memory: PreferenceMemory | str | None = None
    """A ``PreferenceMemory`` or a database URL for per-user weights."""
    weights: dict[str, float] | None = None
    """Guidance weights used when a call names neither weights nor a user."""
    user_id: str | None = None
    """Default user whose stored preferences steer the answers."""
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: list[str] | None = None
    seed: int | None = None
    streaming: bool = False
    preference_prompt: bool = False
    """Also write the preferences into the prompt in plain words."""
    guidance: bool = True
    """Steer decoding with the classifier (False: preference prompting alone, if enabled)."""
    top_k: int | None = 32
    """Candidates the classifier scores per step."""
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

    @property
    def engine(self) -> CLIPerEngine:
        """The process-wide engine for this model spec, loaded on first use and shared."""
        return shared_engine(self.model, self.classifier, top_k=self.top_k)

    def engine_for(self, kwargs: dict[str, Any]) -> CLIPerEngine:
        """The engine for a call: a per-call ``model=`` override picks (and shares) another one."""
        model = kwargs.pop("model", None)
        return self.engine if model in (None, self.model) else shared_engine(model, self.classifier, top_k=self.top_k)

    def build_request(
        self,
        prompt: Any,
        stop: list[str] | None,
        run_manager: RunManager,
        kwargs: dict[str, Any],
        **extra: Any,
    ) -> GenerationRequest:
        """Per-call keyword arguments > ``configurable`` in the run config > the instance's fields."""
        options = {key: value for key, value in kwargs.items() if key not in _LANGCHAIN_KWARGS}
        metadata = getattr(run_manager, "metadata", None) or {}
        user_id = options.pop("user_id", None) or metadata.get("user_id") or self.user_id
        weights = options.pop("weights", None)
        if weights is None and user_id is None:
            weights = self.weights
        request = GenerationRequest(
            prompt,
            weights=weights,
            user_id=user_id,
            memory=as_memory(self.memory),
            max_new_tokens=options.pop("max_tokens", options.pop("max_new_tokens", self.max_tokens)),
            temperature=options.pop("temperature", self.temperature),
            top_p=options.pop("top_p", self.top_p),
            seed=options.pop("seed", self.seed),
            stop=list(stop or options.pop("stop", None) or self.stop or []),
            preference_prompt=options.pop("preference_prompt", self.preference_prompt),
            **{"guidance": options.pop("guidance", self.guidance), **extra},
        )
        if options:
            raise InvalidRequestError(f"Unsupported keyword arguments: {', '.join(sorted(options))}")
        return request

    def response_metadata(self, engine: CLIPerEngine, result: GenerationResult) -> dict[str, Any]:
        return {
            "model_name": engine.loaded.name,
            "finish_reason": result.finish_reason,
            "weights": result.weights,
            "weights_source": result.weights_source,
            "warnings": result.warnings,
            "seconds": round(result.seconds, 3),
        }

    def ls_params(self, model_type: str, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {
            "ls_provider": "cliper",
            "ls_model_name": kwargs.get("model") or self.model,
            "ls_model_type": model_type,
            "ls_temperature": self.temperature,
            "ls_max_tokens": self.max_tokens,
            "ls_stop": stop or self.stop,
        }
