"""GGUF export that stock llama.cpp runs: `transact-edge export DIR --format gguf --outtype q8_0`.

Uniform widths become architecture `llama` (or `qwen2` when unpruned attention allows it) with
explicit key/value lengths; per-layer widths become `deci`, whose per-layer arrays of head_count,
head_count_kv and feed_forward_length llama.cpp honours. Tensors are converted and quantized with gguf-py
(F32, F16, BF16, Q8_0 ... Q4_0 in Python); K- and i-quants, and any type with an importance matrix or a
token-embedding/output type, go through llama.cpp's own llama-quantize (quantize.py). The
tokenizer is copied from the source GGUF when the model came from one, else built from the
Hugging Face tokenizer with gguf-py's vocab helpers. Rope scaling (llama3, linear, yarn) is written
as llama.cpp reads it (see ggufrope). The file appears only when complete.
"""
from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from transact_edge import importance, record
from transact_edge.arch import GRAPHS, PER_LAYER_ARCH, family_of
from transact_edge.checkpoint import atomic_file, require_space
from transact_edge.errors import UserError
from transact_edge.exporters import imatrix, provenance, quantize
from transact_edge.ggufmap import add_ours, permute_qk, read_kv
from transact_edge.ggufrope import ROPE_FREQS, add_keys, rope_freqs, scaling
from transact_edge.loading import EMBEDDED, check_weights, embedded_gguf, read_config, reading, resolve
from transact_edge.lock import claim
from transact_edge.record import Record
from transact_edge.shapes import LayerShape, config_params, head_dim, is_uniform, layer_shapes

log = logging.getLogger(__name__)

# --outtype -> (tensor type of 2-D weights, general.file_type) of what gguf-py writes; llama-quantize makes the rest
PY_OUTTYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
FALLBACK = "F16"  # for rows a block type cannot hold


@dataclass
class GGUFExportOptions:
    checkpoint: str                  # directory, or an embedded model name
    outtype: str = "f16"             # llama-quantize's type names, any case (quantize.TYPES)
    outfile: Path | None = None      # default: {name}-{outtype}.gguf beside the checkpoint
    imatrix: str | None = None       # an importance matrix file, or "auto" (computed here: imatrix.py)
    token_embedding_type: str | None = None   # ggml type names, as llama-quantize has them
    output_tensor_type: str | None = None

    def quantize_options(self) -> quantize.QuantizeOptions:
        lower = lambda name: name.lower() if name else None  # noqa: E731
        return quantize.QuantizeOptions(quantize.canonical(self.outtype), self.imatrix,
                                        lower(self.token_embedding_type), lower(self.output_tensor_type))


def default_outfile(checkpoint: Path, outtype: str) -> Path:
    return checkpoint.parent / f"{checkpoint.name}-{outtype}.gguf"


def _source_gguf(report: Record | None, source: str) -> Path | None:
    """The GGUF file the checkpoint's weights came from, if any: its tokenizer is copied verbatim."""
    name = report.source.model if report else source
    if name in EMBEDDED:
        return embedded_gguf(name)
    if name.endswith(".gguf") and Path(name).is_file():
        return Path(name)
    return None


def _copy_tokenizer(writer, source: Path) -> None:
    for key, val, vtype, sub in read_kv(source, "tokenizer."):
        writer.add_key_value(key, val, vtype, sub)


def _hf_tokenizer(writer, directory: Path) -> None:
    """Vocabulary, merges, special ids and chat template from a Hugging Face tokenizer directory."""
    import gguf

    if (directory / "tokenizer.model").is_file():
        model, vocab = "llama", gguf.vocab.SentencePieceVocab(directory)
    else:
        tj = json.loads((directory / "tokenizer.json").read_text())
        model = "llama" if tj["model"].get("byte_fallback") else "gpt2"
        vocab = gguf.vocab.LlamaHfVocab(directory) if model == "llama" else gguf.vocab.BpeVocab(directory)
    tokens, scores, types = [], [], []
    for text, score, toktype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(toktype)
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if model == "llama":
        writer.add_token_scores(scores)
    gguf.SpecialVocab(directory, load_merges=model == "gpt2", n_vocab=len(tokens)).add_to_gguf(writer)


def _rope_theta(config) -> float:
    return float(scaling(config)["rope_theta"])


def _tensor_type(name: str, shape: tuple[int, ...], wanted):
    """The type a tensor is stored in: norms and biases F32, weights `wanted` if their rows fit."""
    import gguf

    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if shape[-1] % block:
        log.warning("%s: rows of %d do not fill %s blocks of %d; stored as %s", name, shape[-1],
                    wanted.name, block, FALLBACK)
        return gguf.GGMLQuantizationType[FALLBACK]
    return wanted


def _stored(qtype, shape: tuple[int, ...]) -> tuple[tuple[int, ...], object]:
    """Shape and numpy dtype of a tensor's bytes as gguf.quants.quantize returns them."""
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return shape, np.float32
    if qtype == gguf.GGMLQuantizationType.F16:
        return shape, np.float16
    return gguf.quants.quant_shape_to_byte_shape(shape, qtype), np.uint8


def write(directory: Path, config, source_gguf: Path | None, path: Path, outtype: str, report: Record | None) -> None:
    """Write the checkpoint in `directory` as GGUF to `path`, one tensor at a time (not atomic by itself).

    Tensors stream from the safetensors files: read, permuted, quantized and written one by one,
    so memory holds one tensor, not the model.
    """
    import gguf
    from safetensors import safe_open

    shapes = layer_shapes(config)
    arch = _architecture(config, shapes)
    writer = gguf.GGUFWriter(path, arch)
    files = [safe_open(f, framework="pt") for f in sorted(directory.glob("*.safetensors"))]
    plan = _tensor_infos(writer, files, config, arch, gguf.GGMLQuantizationType[PY_OUTTYPES[outtype][0]])
    freqs = rope_freqs(config, head_dim(config))  # llama3 scaling: F32 divisors, written after the weights
    if freqs is not None:
        writer.add_tensor_info(ROPE_FREQS, freqs.shape, freqs.dtype, freqs.nbytes)
    params = sum(int(np.prod(f.get_slice(key).get_shape())) for f, key, _ in plan)
    provenance.for_export(directory, source_gguf, report, params).set_gguf_meta_model(writer)
    _metadata(writer, config, shapes, outtype, report)
    if source_gguf is not None:
        _copy_tokenizer(writer, source_gguf)
    else:
        with reading(directory, "cannot convert its tokenizer to GGUF"):
            _hf_tokenizer(writer, directory)
    try:  # values are packed here: one the config holds may not fit its GGUF type
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
    except (struct.error, OverflowError) as e:
        raise UserError(f"{directory / 'config.json'}: a value GGUF metadata cannot store ({e})") from None
    writer.write_ti_data_to_file()
    for f, key, qtype in tqdm(plan, desc=f"writing {path.name}", unit="tensor", leave=False):
        data = f.get_tensor(key).to(torch.float32).numpy()
        if GRAPHS[arch].norm_rope:
            data = permute_qk(key, data, shapes)
        writer.write_tensor_data(gguf.quants.quantize(data, qtype))
    if freqs is not None:
        writer.write_tensor_data(freqs)
    writer.close()


def _architecture(config, shapes: list[LayerShape]) -> str:
    """The family's own llama.cpp graph for uniform widths it can run, else the per-layer `deci` (also
    for llama3 rope scaling in a graph that does not load rope_freqs: qwen2)."""
    arch = family_of(config.model_type).gguf_arch
    narrow = shapes[0].n_head * head_dim(config) != config.hidden_size
    freqs = scaling(config)["rope_type"] == "llama3" and not GRAPHS[arch].rope_freqs
    own = is_uniform(shapes) and (GRAPHS[arch].narrow or not narrow) and not freqs
    return arch if own else PER_LAYER_ARCH


def _metadata(writer, config, shapes: list[LayerShape], outtype: str, report: Record | None) -> None:
    """Shapes (per layer as arrays when they differ), rope, norm, file type; and what TransAct did."""
    import gguf

    hd, uniform = head_dim(config), is_uniform(shapes)
    writer.add_file_type(getattr(gguf.LlamaFileType, PY_OUTTYPES[outtype][1]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(len(shapes))
    per_layer = lambda field: getattr(shapes[0], field) if uniform else [getattr(s, field) for s in shapes]  # noqa: E731
    writer.add_feed_forward_length(per_layer("ffn_dim"))
    writer.add_head_count(per_layer("n_head"))
    writer.add_head_count_kv(per_layer("n_kv_head"))
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_rope_dimension_count(hd)
    writer.add_rope_freq_base(_rope_theta(config))
    add_keys(writer, scaling(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    add_ours(writer, "family", family_of(config.model_type).model_type)  # our importer's classes
    if report:  # what was done, for llama.cpp consumers
        add_ours(writer, "source", report.source.model)
        add_ours(writer, "shots", report.options["shots"])
        add_ours(writer, "calibration_tokens", report.calibration.tokens)
        add_ours(writer, "recovery_tokens", report.options["train_tokens"])
        add_ours(writer, "dense_params", report.dense.params)
        for field in ("n_head", "n_kv_head", "ffn_dim"):
            add_ours(writer, field, [getattr(s, field) for s in shapes])


def _tensor_infos(writer, files: list, config, arch: str, wanted) -> list[tuple]:
    """Every tensor's GGUF name, type and stored shape, declared to the writer; (file, key, type) in file order."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    plan = []
    for f in files:
        for key in f.keys():
            if key == "lm_head.weight" and config.tie_word_embeddings:
                continue
            gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise UserError(f"no GGUF name for tensor {key}")
            shape = tuple(f.get_slice(key).get_shape())
            qtype = _tensor_type(gname, shape, wanted)
            byte_shape, dtype = _stored(qtype, shape)
            writer.add_tensor_info(gname, byte_shape, np.dtype(dtype), int(np.prod(byte_shape)) * np.dtype(dtype).itemsize,
                                   raw_dtype=qtype)
            plan.append((f, key, qtype))
    return plan


def export(opts: GGUFExportOptions) -> Path:
    """Write the GGUF atomically (temporary sibling + rename); returns its path."""
    import gguf

    q = opts.quantize_options()
    directory = resolve(opts.checkpoint)
    if directory.is_file():
        raise UserError(f"{opts.checkpoint}: already a GGUF file; export takes a checkpoint directory")
    config = read_config(opts.checkpoint)
    check_weights(directory, config)  # the config must describe these weights before it drives anything
    report = record.read(directory)
    out = Path(opts.outfile) if opts.outfile else default_outfile(Path(opts.checkpoint), q.outtype)
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: output's parent directory does not exist")
    if any(s.ffn_dim == 0 for s in layer_shapes(config)):  # llama.cpp's deci skips such layers, attention too
        raise UserError("a layer with MLP width 0 cannot be represented in llama.cpp's deci graph")
    scaling(config)  # refused before anything is written
    quantize.check(q, config.hidden_size)
    if q.imatrix not in (None, "auto"):
        importance.check_file(Path(q.imatrix), config, q.outtype in quantize.NEEDS_IMATRIX)
    tool = quantize.tool() if q.needs_llama_quantize else None
    staged = tool is not None  # llama-quantize reads an F32 file staged beside the output
    qtype = gguf.GGMLQuantizationType["F32" if staged else PY_OUTTYPES[q.outtype][0]]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    require_space(out.absolute().parent, (1 + staged) * int(config_params(config) * size / block) + 2**20,
                  "the GGUF")

    with claim(out):  # one writer per output; what a killed export left beside it is swept
        source = _source_gguf(report, opts.checkpoint)
        with atomic_file(out) as tmp:
            if tool is None:
                write(directory, config, source, tmp, q.outtype, report)
            else:
                _via_llama_quantize(tool, opts.checkpoint, (directory, config, source, report), tmp, q)
    return out


def _via_llama_quantize(tool: Path, checkpoint: str, src: tuple, tmp: Path, q: quantize.QuantizeOptions) -> None:
    """An F32 file staged beside the output (and the `auto` importance matrix), then llama-quantize."""
    directory, config, source, report = src
    staged = tmp.parent / f"{tmp.name}.f32"
    matrix = tmp.parent / f"{tmp.name}.imatrix.gguf" if q.imatrix == "auto" else q.imatrix and Path(q.imatrix)
    try:
        write(directory, config, source, staged, "f32", report)
        if q.imatrix == "auto":
            imatrix.auto(checkpoint, staged, matrix)
        quantize.run(tool, staged, tmp, q, matrix)
    finally:
        staged.unlink(missing_ok=True)
        if q.imatrix == "auto":
            matrix.unlink(missing_ok=True)


from transact_edge.exporters.gguf_verify import Verification, verify  # noqa: E402,F401  (the documented entry point)
