"""CLIPer: classifier-guided inference-time personalization of local LLMs."""

from cliper_integrations.core.classifier import PreferenceClassifier
from cliper_integrations.core.engine import CLIPerEngine, GenerationRequest, GenerationResult
from cliper_integrations.core.errors import CLIPerError
from cliper_integrations.core.logits_processor import ClassifierGuidedLogitsProcessor
from cliper_integrations.core.models import load_model
from cliper_integrations.core.preferences import ALIASES, DEFAULT_CLASSES

__all__ = [
    "ALIASES",
    "DEFAULT_CLASSES",
    "CLIPerEngine",
    "CLIPerError",
    "ClassifierGuidedLogitsProcessor",
    "GenerationRequest",
    "GenerationResult",
    "PreferenceClassifier",
    "load_model",
]
