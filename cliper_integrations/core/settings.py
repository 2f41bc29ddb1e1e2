"""Settings a framework object carries, and how one call's keyword arguments become a core request.

The LangChain and LlamaIndex classes both inherit ``GenerationSettings``, so the rules (per-call
arguments > the user's stored preferences > the object's defaults; unknown arguments refused) are
written once, here.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cliper_integrations.core.engine import (
    DEFAULT_BATCH_WINDOW,
    CLIPerEngine,
    GenerationRequest,
    GenerationResult,
    shared_engine,
)
from cliper_integrations.core.errors import InvalidRequestError
from cliper_integrations.core.memory import PreferenceMemory, as_memory
from cliper_integrations.core.models import ModelDType


class GenerationSettings(BaseModel):
    """A personalized local model's settings; per-call keyword arguments override them."""

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
    preference_prompt: bool = False
    """Also write the preferences into the prompt in plain words (weights from memory are then scaled by
    the classifier's ``prompted_weight_factors``, without it by its ``unprompted_weight_factors``;
    explicit weights are used as given)."""
    guidance: bool = True
    """Steer decoding with the classifier (False: preference prompting alone, if enabled)."""
    top_k: int | None = 32
    """Candidates the classifier scores per step."""
    dtype: ModelDType = "float32"
    """What the model is loaded in (``ModelDType``): ``bfloat16`` decoded 2.2 to 2.3× faster, guided
    or not, on an AVX512-BF16 CPU (``docs/performance.md``)."""
    batch_window: float | None = Field(default=DEFAULT_BATCH_WINDOW, ge=0)
    """Seconds a call waits for calls from other threads (LangChain's ``batch``, concurrent queries), which the
    engine then answers in one batch; None answers each call alone."""
    answer_after_tool_result: bool = False
    """Offer no tools when the last message is a tool result, so the model answers in words (the
    0.5B default model otherwise tends to call the same tool again)."""
    timeout: float | None = None
    """Seconds a call may take, waiting for its batch included; past them it raises ``GenerationTimeoutError`` (its
    row stops decoding at the next token)."""

    @property
    def engine(self) -> CLIPerEngine:
        """The process-wide engine for this model spec, loaded on first use and shared."""
        return self.engine_for({})

    def engine_for(self, options: dict[str, Any]) -> CLIPerEngine:
        """The engine for a call: a per-call ``model=`` override picks (and shares) another one."""
        model = options.pop("model", None)
        model = self.model if model is None else model
        return shared_engine(model, self.classifier, top_k=self.top_k, dtype=self.dtype, batch_window=self.batch_window)

    def build_request(
        self, prompt: Any, stop: list[str] | None, options: dict[str, Any], **extra: Any
    ) -> GenerationRequest:
        """A request from this call's ``options`` (consumed; anything unknown left over is refused)."""
        user_id = options.pop("user_id", None) or self.user_id
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
            answer_after_tool_result=options.pop("answer_after_tool_result", self.answer_after_tool_result),
            timeout=options.pop("timeout", self.timeout),
            **{"guidance": options.pop("guidance", self.guidance), **extra},
        )
        if options:
            raise InvalidRequestError(f"Unsupported keyword arguments: {', '.join(sorted(options))}")
        return request

    @staticmethod
    def result_metadata(engine: CLIPerEngine, result: GenerationResult) -> dict[str, Any]:
        """What a framework response reports about a generation, beyond its text."""
        return {
            "model_name": engine.loaded.name,
            "finish_reason": result.finish_reason,
            "weights": result.weights,
            "weights_source": result.weights_source,
            "warnings": result.warnings,
            "seconds": round(result.seconds, 3),
            "usage": {
                "input_tokens": result.prompt_tokens,
                "output_tokens": result.completion_tokens,
                "total_tokens": result.total_tokens,
            },
        }
