"""Fixtures: tiny random models of each family saved as directories (helpers.TINY) and the real SmolLM2."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
# The cores shared out among xdist's workers (and the processes they start), set before torch starts its pool:
# two workers of two threads each on two cores made OpenMP's spinning threads wait on each other (two
# concurrent real prunes: 95 s with two threads each, 58 s with one).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    for _var in ("OMP_NUM_THREADS", "LLAMA_ARG_THREADS"):  # torch's pool; llama.cpp's tools when no -t is given
        os.environ.setdefault(_var, str(max(1, (os.cpu_count() or 1) // _workers)))

import pytest

from helpers import TINY, tiny_model
from transact_edge import corpus, plan
from transact_edge.calibration import collect
from transact_edge.checkpoint import save
from transact_edge.loading import load
from transact_edge.record import Calibration, Record, Shapes, Source
from transact_edge.salience import from_stats
from transact_edge.shapes import LayerShape, is_uniform, layer_shapes
from transact_edge.surgery import cut


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (embedded GGUF, converted once to the cache)."""
    return load("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    return smollm2.tokenizer


def _save_tiny(family: str, tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp(f"tiny-{family}")
    tiny_model(family).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(params=sorted(TINY))
def tiny_dir(request, tmp_path_factory, tokenizer):
    """A tiny random model of each family saved as a Hugging Face directory with a real tokenizer."""
    return _save_tiny(request.param, tmp_path_factory, tokenizer)


@pytest.fixture
def tiny_llama_dir(tmp_path_factory, tokenizer):
    return _save_tiny("llama", tmp_path_factory, tokenizer)


@pytest.fixture(scope="session")
def pruned_dirs(smollm2, tmp_path_factory):
    """SmolLM2 pruned to 2 KV heads and MLP 768: uniform and per-layer checkpoints."""
    model = smollm2.model
    ids = corpus.stream(smollm2.tokenizer)[: 4 * 256].view(4, 256)
    shapes = layer_shapes(model.config)
    stats = from_stats(collect(model, ids), shapes)
    uni = LayerShape(6, 2, 768)
    out = {}
    for name, widths in (("uniform", [uni] * len(shapes)),
                         ("per_layer", plan.per_layer_widths(stats, shapes, uni, round_to=32))):
        path = tmp_path_factory.mktemp(name)
        save(path, cut(model, plan.select(stats, shapes, widths)), smollm2.tokenizer)
        Record(Source("smollm2-135m"), {"shots": 1, "train_tokens": 0}, Calibration.of("wiki", ids),
               Shapes(layers=[], params=134515008)).write(path)
        out[name] = path
    assert not is_uniform(layer_shapes(load(str(out["per_layer"])).model.config))
    return out
