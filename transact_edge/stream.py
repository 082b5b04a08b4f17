"""Layer-streamed TransAct: prune a checkpoint larger than memory, one decoder layer at a time.

Pass 1 reads each layer's weights from the memory-mapped safetensors of a Hugging Face directory,
runs the calibration batch's hidden states through it (carried from layer to layer, in the
checkpoint's dtype) with the same float64 hooks as calibration.collect, and drops the layer before
the next is loaded. The statistics are small (one vector per layer), so widths (uniform or
--per-layer) and kept indices come from plan.select exactly as in memory. Pass 2 reads each layer
again, cuts it with surgery's own state-dict transform and writes the checkpoint shard by shard.
Memory: one layer's weights, the hidden states of the calibration batch (twice), one output shard.
One shot, TransAct salience, no recovery: recovery training of such models is the distributed path.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from transact_edge import plan
from transact_edge.calibration import Stats, hooked_layer
from transact_edge.checkpoint import atomic_dir
from transact_edge.loading import check_finite, check_weights, load_tokenizer, reading
from transact_edge.salience import from_stats
from transact_edge.shapes import LayerShape, count_params, head_dim, layer_shapes, summary
from transact_edge.memory import own_peak_rss_mib
from transact_edge.modeling import config_for, skeleton
from transact_edge.options import PruneOptions
from transact_edge.record import Calibration, Record, Shot
from transact_edge.surgery import cut_layer

log = logging.getLogger(__name__)
SHARD_BYTES = 2 * 1024**3   # output shards of at most ~2 GiB, as save_pretrained writes them


class Weights:
    """Every tensor of a safetensors checkpoint by name, read on demand. Each read opens the file's
    memory map and closes it again, so pages already read do not stay mapped into the process.
    Every tensor read is checked for NaN and Inf (a UserError naming it)."""

    def __init__(self, directory: Path):
        self.files: dict[str, Path] = {}
        for f in sorted(directory.glob("*.safetensors")):
            with reading(f, "not a readable safetensors file"), safe_open(f, "pt") as handle:
                self.files.update({key: f for key in handle.keys()})

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for f in dict.fromkeys(self.files[k] for k in keys):
            with reading(f, "not a readable safetensors file"), safe_open(f, "pt") as handle:
                out.update({k: handle.get_tensor(k) for k in keys if self.files[k] == f})
        for k, v in out.items():
            check_finite(k, v, self.files[k])
        return out

    def prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in self.read([k for k in self.files if k.startswith(prefix)]).items()}

    def get(self, key: str) -> torch.Tensor:
        return self.read([key])[key]


def _skeleton(config):
    """The model on the meta device (no memory) and a real rotary-embedding module."""
    config._attn_implementation = "sdpa"  # causal without a mask, as in the full model's forward
    model = skeleton(config).eval()  # no attention dropout while statistics are collected
    rotary = type(model.model.rotary_emb)(config=config)
    return model, rotary


def _params(config) -> int:
    """Parameters of a model of this config, counted on the meta device (no memory)."""
    return count_params(skeleton(config))


def _load_layer(model, weights: Weights, il: int):
    layer = model.model.layers[il]
    layer.load_state_dict(weights.prefix(f"model.layers.{il}."), strict=True, assign=True)
    return layer


@torch.inference_mode()
def collect_streamed(directory: Path, config, windows: torch.Tensor, batch_size: int) -> Stats:
    """calibration.collect's statistics, computed one layer at a time from the files."""
    weights = Weights(directory)
    model, rotary = _skeleton(config)
    dtype = weights.get("model.embed_tokens.weight").dtype
    hidden = torch.nn.functional.embedding(windows, weights.get("model.embed_tokens.weight"))  # (N, T, H)
    positions = torch.arange(windows.shape[1])[None]
    cos_sin = rotary(hidden[:1], positions)
    mha, mlp = [], []
    for il in tqdm(range(config.num_hidden_layers), desc="streamed salience", unit="layer", leave=False):
        layer = _load_layer(model, weights, il)
        out = torch.empty_like(hidden)
        with hooked_layer(layer) as (acc_mha, acc_mlp):
            for i in range(0, hidden.shape[0], batch_size):
                batch = hidden[i:i + batch_size]
                out[i:i + batch_size] = layer(batch, attention_mask=None, position_ids=positions,
                                              position_embeddings=tuple(c.expand(batch.shape[0], -1, -1).to(dtype)
                                                                        for c in cos_sin))
        layer.to("meta")  # drop the weights before the next layer is read
        hidden = out
        mha.append(acc_mha)
        mlp.append(acc_mlp)
    for key in weights.files:  # the rest (final norm, output head) is checked before pass 2 writes
        if not key.startswith("model.layers."):
            weights.get(key)
    return Stats(mha, mlp, windows.numel())


def write_pruned(directory: Path, out: Path, config, plans: list[plan.LayerPlan], report: Record, start: float) -> None:
    """The pruned checkpoint, shard by shard, tokenizer and transact.json included (atomic; the report's
    total time and peak memory are taken last, before the directory is published)."""
    weights = Weights(directory)
    hd = head_dim(config)
    new_config = config_for(config, [p.shape for p in plans])
    with atomic_dir(out, force=True) as tmp:
        shard, shard_bytes, index, n = {}, 0, {}, 0

        def flush() -> None:
            nonlocal shard, shard_bytes, n
            if shard:
                n += 1
                name = f"model-{n:05d}.safetensors"
                save_file(shard, tmp / name, metadata={"format": "pt"})
                index.update({k: name for k in shard})
                shard, shard_bytes = {}, 0

        groups = [("", weights.read([k for k in weights.files if not k.startswith("model.layers.")]))]
        groups += [(f"model.layers.{il}", None) for il in range(config.num_hidden_layers)]
        for prefix, tensors in tqdm(groups, desc="streamed surgery", unit="layer", leave=False):
            if tensors is None:
                il = int(prefix.rsplit(".", 1)[1])
                tensors = {f"{prefix}.{k}": v for k, v in weights.prefix(prefix + ".").items()}
                cut_layer(tensors, prefix, plans[il], hd)
            for k, v in tensors.items():
                shard[k] = v.contiguous()
                shard_bytes += v.numel() * v.element_size()
                if shard_bytes >= SHARD_BYTES:
                    flush()
        flush()
        names = sorted(set(index.values()))
        if len(names) == 1:
            (tmp / names[0]).rename(tmp / "model.safetensors")
        else:
            (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
        new_config.save_pretrained(tmp)
        load_tokenizer(directory).save_pretrained(tmp)
        report.timings.seconds["total"] = time.perf_counter() - start
        report.timings.peak_rss_mib = own_peak_rss_mib()
        report.write(tmp)


def prune_streamed(directory: Path, opts: PruneOptions, windows: torch.Tensor) -> Record:
    """One TransAct shot over a checkpoint directory in bounded memory (into opts.out); returns its record."""
    from transformers import AutoConfig

    start = time.perf_counter()
    config = AutoConfig.from_pretrained(directory)
    check_weights(directory, config)  # before any layer is read: the config must describe these weights
    shapes, hd = layer_shapes(config), head_dim(config)
    widest = max(shapes, key=lambda s: (s.n_head, s.ffn_dim))
    uniform = plan.target(widest, opts.widths, hd)
    report = Record.begin(opts.fingerprint(), opts.model, directory, config.model_type,
                          Calibration.of(opts.calib, windows), summary(shapes, hd, _params(config)))
    scores = from_stats(collect_streamed(directory, config, windows, opts.batch_size), shapes)
    new = (plan.per_layer_widths(scores, shapes, uniform, opts.widths.round_to) if opts.per_layer
           else [uniform] * len(shapes))
    plans = plan.select(scores, shapes, new)
    kept = plan.Plan.dense(shapes, {"model": opts.model, "model_type": config.model_type}, report.made())
    kept.apply(plans)
    new = [p.shape for p in plans]
    report.shots.append(Shot(1, widths=[s.as_dict() for s in new], row_lengths=plan.row_lengths(new, hd)))
    report.finish(summary(new, hd, _params(config_for(config, new))), kept.to_json(),
                  {"salience": time.perf_counter() - start})
    write_pruned(directory, opts.out, config, plans, report, start)
    log.info("streamed prune: %s", ", ".join(f"{LayerShape(**s)}" for s in report.pruned.layers[:3]))
    return report
