"""Exception types: each kind of bad input has its own, all under ``CLIPerError``."""

from __future__ import annotations


class CLIPerError(Exception):
    """Base class of every error this package raises on purpose."""


class UnknownClassError(CLIPerError, KeyError):
    """A preference class name that is neither a known class nor an alias."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


class InvalidWeightError(CLIPerError, ValueError):
    """A guidance weight that is negative, NaN or infinite."""


class ClassNotInClassifierError(CLIPerError, ValueError):
    """A weight for a class the loaded classifier was not trained on."""


class VocabularyMismatchError(CLIPerError, ValueError):
    """A classifier trained for a tokenizer other than the base model's."""


class EmptyPromptError(CLIPerError, ValueError):
    """A request with no prompt text."""


class PromptTooLongError(CLIPerError, ValueError):
    """A prompt that does not fit the model's context window (policy ``refuse``)."""


class ModelResolutionError(CLIPerError, ValueError):
    """A model spec that names no usable model (bad path, invalid GGUF, failed checksum)."""


class ChecksumError(ModelResolutionError):
    """The assembled embedded GGUF file does not have the published SHA-256."""


class MissingDependencyError(CLIPerError, ImportError):
    """An optional package is needed; the message names the extra that installs it."""


class NoClassifierError(CLIPerError, ValueError):
    """Guidance weights were asked for, but no classifier is available for the model."""


class InvalidRequestError(CLIPerError, ValueError):
    """A generation setting out of range (max_new_tokens < 1, negative or NaN temperature, …)."""


class GenerationTimeoutError(CLIPerError, TimeoutError):
    """A call ran past its ``timeout``; its row stopped at the next token (the text so far is in the result)."""


class MemoryUnavailableError(CLIPerError, RuntimeError):
    """The preference memory could not be read for this request (its database failed)."""


class EvalStoreError(CLIPerError, ValueError):
    """Stored evaluation responses cannot be resumed: another run made them (classifier, token budget,
    prompt file), or the file is damaged."""
