"""What a model reads per token (weights, KV cache) and holds, from its file's header or config alone:
the roofline's denominator and the memory a device profile must allow."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from transact_edge.errors import UserError
from transact_edge.ggufmap import layer_shapes, read_header

MIB = 1024 * 1024


@dataclass
class ModelFacts:
    path: str
    name: str
    size_bytes: int                 # weights as stored
    params: int
    weight_bytes_per_token: int     # read once per decoded token
    kv_bytes_per_token: int         # K+V over all layers, in the runtime's cache type
    vocab: int


def gguf_facts(path: Path) -> ModelFacts:
    import gguf

    kv, tensors = read_header(path)  # sizes and types checked against the file
    meta = {k: v for k, v, *_ in kv}
    try:
        shapes, k_len, v_len = layer_shapes(meta, {name: shape for name, shape, _ in tensors})
    except ValueError as e:
        raise UserError(f"{path}: not a model GGUF we read ({e})") from None
    nbytes, params, vocab = {}, 0, 0
    for name, shape, ttype in tensors:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        n = math.prod(shape)
        nbytes[name], params = n // block * size, params + n
        if name == "token_embd.weight" and len(shape) == 2:
            vocab = int(shape[1])
    read = sum(nbytes.values())
    if "output.weight" in nbytes and vocab:  # untied: the embedding contributes one row per token
        read -= nbytes["token_embd.weight"] - nbytes["token_embd.weight"] // vocab
    return ModelFacts(str(path), path.stem, sum(nbytes.values()), params, read,
                      sum(s.n_kv_head * (k_len + v_len) for s in shapes) * 2, vocab)   # f16 K and V: llama.cpp's default


def onnx_facts(path: Path) -> ModelFacts:
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:  # onnx raises DecodeError and friends
        raise UserError(f"{path}: not a readable ONNX file ({type(e).__name__})") from None
    sizes, params = {}, 0
    for t in graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        params += n
        sizes[t.name] = n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    users: dict[str, int] = {}
    for node in graph.node:
        for i in node.input:
            users[i] = users.get(i, 0) + 1
    read = sum(sizes.values())
    vocab = 0
    for node in graph.node:
        if node.op_type == "Gather" and node.input[0] in sizes:
            emb = next(t for t in graph.initializer if t.name == node.input[0])
            vocab = max(vocab, int(emb.dims[0]))
            if users[node.input[0]] == 1:  # only gathered: one row per token
                read -= sizes[node.input[0]] - sizes[node.input[0]] // int(emb.dims[0])
    kv = 0
    for i in graph.input:
        if i.name.startswith("past_key_values."):
            dims = i.type.tensor_type.shape.dim
            kv += dims[1].dim_value * dims[3].dim_value * \
                onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).itemsize
    return ModelFacts(str(path), path.stem, sum(sizes.values()), params, read, kv, vocab)


def torch_facts(source: str) -> ModelFacts:
    from transact_edge.loading import read_config, resolve
    from transact_edge.shapes import head_dim, kv_bytes_per_token, layer_shapes

    config = read_config(source)
    path = resolve(source)
    hidden, vocab = config.hidden_size, config.vocab_size
    shapes = layer_shapes(config)
    attn = sum(s.n_head * head_dim(config) * hidden * 2 + s.n_kv_head * head_dim(config) * hidden * 2 for s in shapes)
    mlp = sum(3 * s.ffn_dim * hidden for s in shapes)
    norms = (2 * len(shapes) + 1) * hidden
    tied = getattr(config, "tie_word_embeddings", False)
    params = attn + mlp + norms + vocab * hidden * (1 if tied else 2)
    read = 4 * (attn + mlp + norms + vocab * hidden + (0 if tied else hidden))
    return ModelFacts(str(path), Path(path).name, 4 * params, params, read,
                      kv_bytes_per_token(shapes, head_dim(config), 4), vocab)


def genai_facts(path: Path) -> ModelFacts:
    """An onnxruntime-genai directory: the facts of the graph its genai_config.json names."""
    import json

    try:
        graph = path / json.loads((path / "genai_config.json").read_text())["model"]["decoder"]["filename"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: not an onnxruntime-genai directory ({type(e).__name__}: {e})") from None
    return replace(onnx_facts(graph), path=str(path), name=path.name)


FACTS = {"llama.cpp": gguf_facts, "onnxruntime": onnx_facts, "onnxruntime-genai": genai_facts}


def facts(model: str, runtime: str) -> ModelFacts:
    if runtime == "torch":
        return torch_facts(model)
    path = Path(model)
    if runtime == "onnxruntime-genai" and path.is_file():
        path = path.parent  # the graph was named: its directory holds genai_config.json
    if not path.exists() or (runtime != "onnxruntime-genai" and not path.is_file()):
        raise UserError(f"model file not found: {model}")
    return FACTS[runtime](path)
