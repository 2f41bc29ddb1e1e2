"""``CLIPerLLM``: the text-completion (``BaseLLM``) form of the personalized local model."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun, Callbacks
from langchain_core.language_models import BaseLLM, LanguageModelInput
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import get_config_list

from cliper_integrations.core.engine import CLIPerEngine, GenerationRequest, GenerationResult
from cliper_integrations.langchain._common import CLIPerParams, user_from_config


def _users(configs: list[RunnableConfig], kwargs: dict[str, Any]) -> set[str | None]:
    """The users a batch's inputs are for."""
    return {user_from_config(config, kwargs).get("user_id") for config in configs}


class CLIPerLLM(CLIPerParams, BaseLLM):
    """Completion model on a local LLM, steered per user by a preference classifier (CLIPer).

    A prompt is sent as one user turn through the model's chat template (``raw_prompt=True`` sends it as
    is). All prompts of one ``generate``/``batch`` call run in one batched decoding pass.
    """

    raw_prompt: bool = False

    @property
    def _llm_type(self) -> str:
        return "cliper"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {**super()._identifying_params, "raw_prompt": self.raw_prompt}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        return self.ls_params("llm", stop, kwargs)

    def _text_request(
        self, prompt: str, stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[CLIPerEngine, GenerationRequest]:
        return self.lc_request(prompt, stop, kwargs, raw_prompt=self.raw_prompt)

    def _batch_requests(
        self, prompts: list[str], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[CLIPerEngine, list[GenerationRequest]]:
        """One engine for the whole batch (every prompt shares the call's options) and a request per prompt."""
        pairs = [self._text_request(prompt, stop, kwargs) for prompt in prompts]
        return pairs[0][0], [request for _, request in pairs]

    def _generation(self, engine: CLIPerEngine, result: GenerationResult) -> list[Generation]:
        return [Generation(text=result.text, generation_info=self.result_metadata(engine, result))]

    @staticmethod
    def _answers(engine: CLIPerEngine, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """A lone prompt joins the calls other threads make meanwhile (the engine's request batcher: a server, or a
        thread pool that calls ``invoke`` once per input); several prompts are one batch of their own."""
        return [engine.generate(requests[0])] if len(requests) == 1 else engine.generate_batch(requests)

    @staticmethod
    async def _aanswers(engine: CLIPerEngine, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """``_answers`` for async calls: a lone prompt awaits its row without holding a thread; cancelling the task
        stops every row at its next token."""
        if len(requests) == 1:
            return [await engine.agenerate(requests[0])]
        return await engine.agenerate_batch(requests)

    def _results(self, engine: CLIPerEngine, results: list[GenerationResult]) -> LLMResult:
        for result in results:
            result.raise_for_error()
        usage = {
            "input_tokens": sum(r.prompt_tokens for r in results),
            "output_tokens": sum(r.completion_tokens for r in results),
        }
        return LLMResult(generations=[self._generation(engine, r) for r in results], llm_output={"token_usage": usage})

    # --- the protocol: the call's user and settings reach the cache key and every input of a batch ---------------

    def generate(
        self, prompts: list[str], stop: list[str] | None = None, callbacks: Callbacks = None, **kwargs: Any
    ) -> LLMResult:
        """``BaseLLM.generate`` on a copy whose fields carry the call's settings: a ``BaseLLM`` keys its cache on its
        fields, not on the call's keywords, so one user's cached answer would otherwise be served to another."""
        return super(CLIPerLLM, self.with_call_settings(kwargs)).generate(prompts, stop, callbacks, **kwargs)

    async def agenerate(
        self, prompts: list[str], stop: list[str] | None = None, callbacks: Callbacks = None, **kwargs: Any
    ) -> LLMResult:
        """``generate`` for async calls."""
        return await super(CLIPerLLM, self.with_call_settings(kwargs)).agenerate(prompts, stop, callbacks, **kwargs)

    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """Inputs for one user as one engine batch (``BaseLLM.batch``, with the config's user); inputs whose configs
        name different users as one ``invoke`` each, which the engine's request batcher gathers into one batch:
        ``BaseLLM.batch`` would answer every input for the first one's user."""
        configs = get_config_list(config, len(inputs))
        if len(_users(configs, kwargs)) > 1:
            configs = self.in_flight(configs, kwargs)
            return Runnable.batch(self, inputs, configs, return_exceptions=return_exceptions, **kwargs)
        kwargs = user_from_config(configs[0], kwargs) if configs else kwargs
        return super().batch(inputs, configs, return_exceptions=return_exceptions, **kwargs)

    async def abatch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """``batch`` for async calls (one ``ainvoke`` per input where the users differ)."""
        configs = get_config_list(config, len(inputs))
        if len(_users(configs, kwargs)) > 1:
            return await Runnable.abatch(self, inputs, configs, return_exceptions=return_exceptions, **kwargs)
        kwargs = user_from_config(configs[0], kwargs) if configs else kwargs
        return await super().abatch(inputs, configs, return_exceptions=return_exceptions, **kwargs)

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        engine, requests = self._batch_requests(prompts, stop, kwargs)
        return self._results(engine, self._answers(engine, requests))

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        engine, requests = self._batch_requests(prompts, stop, kwargs)
        return self._results(engine, await self._aanswers(engine, requests))

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        engine, request = self._text_request(prompt, stop, kwargs)
        stream = engine.stream(request)
        for delta in stream:
            chunk = GenerationChunk(text=delta)
            if run_manager:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        yield GenerationChunk(text="", generation_info=self._generation(engine, stream.result)[0].generation_info)

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        engine, request = self._text_request(prompt, stop, kwargs)
        stream = engine.stream(request)
        async for delta in stream:
            chunk = GenerationChunk(text=delta)
            if run_manager:
                await run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        yield GenerationChunk(text="", generation_info=self._generation(engine, stream.result)[0].generation_info)
