"""The TransAct driver: load -> (calibrate -> score -> cut -> recover -> checkpoint) x shots -> save.

Shen et al., "Pruning Large Language Models to Intra-module Low-rank Architecture with
Transitional Activations", ACL Findings 2024 (arXiv 2407.05690). Example:
    transact-edge prune --model smollm2-135m --kv-heads 2 --mlp-ratio 0.5 --shots 2 --out pruned/
Each finished shot is checkpointed in a hidden sibling of the output (`.NAME.partial/shot-K`);
`--resume` continues after the last one. The output appears only when everything is done.
"""
from __future__ import annotations

import logging
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from transact_edge import corpus, depth, distributed, heal, importance, lock, plan, recovery, refit, runstate, salience
from transact_edge.checkpoint import atomic_dir, check_output, require_space, save
from transact_edge.errors import UserError
from transact_edge.options import PruneOptions, recovery_options, validate
from transact_edge.record import Calibration, Record, Shot
from transact_edge.evaluate import perplexity
from transact_edge.loading import check_weights, load, load_tokenizer, read_config, resolve
from transact_edge.shapes import config_params, count_params, head_dim, layer_shapes, summary, widths_line
from transact_edge.surgery import cut

log = logging.getLogger(__name__)


def _shape_summary(model) -> dict:
    return summary(layer_shapes(model.config), head_dim(model.config), count_params(model))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _widest(shapes):
    return max(shapes, key=lambda s: (s.n_head, s.ffn_dim))


def check(opts: PruneOptions, processes: int = 1) -> None:
    """Everything about the options that can be refused before any weight is read."""
    validate(opts)
    if opts.stream and processes > 1:
        raise UserError("--stream runs in one process; drop the launcher")
    check_output(opts.out, opts.force)
    config = read_config(opts.model)
    if config is not None:  # the config must describe the weights (headers only) before its sizes drive anything
        check_weights(resolve(opts.model), config)
    replay = plan.Plan.load(Path(opts.plan)) if opts.plan else None
    if config is not None and replay is not None:
        replay.check_source(layer_shapes(config), f"--plan {opts.plan}")
    elif config is not None:
        dense, hd = _widest(layer_shapes(config)), head_dim(config)
        final = plan.target(dense, opts.widths, hd)
        note = plan.unquantizable_rows(dense, [final], hd) if opts.widths.round_to == plan.AUTO else None
        if note:  # once, before the run
            log.warning(note)
        if opts.drop_layers:
            depth.check(opts.drop_layers, config.num_hidden_layers)
    if config is not None:  # float32 weights: the output, and a shot's checkpoint and recovery's beside it
        copies = 1 + (opts.shots > 1 or opts.train_tokens > 0) + (opts.train_tokens > 0)
        require_space(opts.out.absolute().parent, copies * 4 * config_params(config), "pruning this model")


def prune(opts: PruneOptions) -> Record:
    """Run the whole schedule and write opts.out; returns the record also saved as transact.json.

    Started by a launcher (distributed.py), every process runs this with the same options.
    """
    with lock.claim(opts.out) if distributed.first_process() else nullcontext():  # one run per output
        check(opts, distributed.launched_processes())
        if opts.stream:
            return _prune_streamed(opts)
        group = distributed.join(opts.device)
        try:
            return _prune(opts, group)
        finally:
            distributed.leave()


@dataclass
class _Run:
    """An in-memory prune as it goes: the model, the plan of what it keeps, the record, the partial directory."""
    opts: PruneOptions
    group: distributed.Group | None
    model: Any
    tok: Any
    kept: plan.Plan
    report: Record
    partial: Path
    start: int = 0          # the first shot still to run
    state: dict = field(default_factory=dict)  # of the checkpoint resumed from
    live: bool = False      # resumed inside a shot's recovery
    replay: plan.Plan | None = None  # --plan: the saved cut to apply instead of scoring

    @property
    def main(self) -> bool:
        return self.group is None or self.group.main

    def state_of(self, **more) -> dict:
        return {"options": self.opts.fingerprint(), "plan": self.kept.to_json(), "report": self.report.to_json(), **more}


def _prune(opts: PruneOptions, group: distributed.Group | None) -> Record:
    t = time.perf_counter()
    loaded = load(opts.model)
    device = group.device if group is not None else resolve_device(opts.device)
    model, tok = loaded.model.to(device), loaded.tokenizer
    train_ids = corpus.stream(tok, opts.calib, "train")
    calib = corpus.windows(train_ids, opts.seq_len, opts.calib_samples)  # the same windows every shot
    seconds = {"load": time.perf_counter() - t}
    run = _resume(opts, group, model, tok, device) or _begin(opts, group, model, tok, loaded.path, calib, seconds)
    teacher = data = val = None
    if opts.train_tokens > 0:
        t = time.perf_counter()
        teacher, data, val = heal.setup(opts, run.model, tok, train_ids, device, group, run.report)
        if "data" in run.state:
            data.restore(run.state["data"])
        seconds["recovery_setup"] = time.perf_counter() - t
    budgets = recovery.tokens_per_shot(opts.train_tokens, opts.shots, opts.schedule)
    for shot in range(run.start, opts.shots):
        _shot(run, shot, calib, budgets[shot], teacher, data, val)
    return _finish(run, seconds)


def _resume(opts: PruneOptions, group: distributed.Group | None, model, tok, device: torch.device) -> _Run | None:
    """The run as its last checkpoint left it (a finished shot, or recovery inside one), if --resume finds one."""
    partial = runstate.partial_dir(opts.out)
    if not opts.resume:
        return None
    done = runstate.last_shot(partial, opts.fingerprint()) if partial.is_dir() else None
    live = runstate.live(partial, opts.fingerprint())
    if live and done and live[0] < done[0]:  # stopped between a shot's checkpoint and clearing its live state
        live = None
    if not (done or live):
        return None
    start, state = live or done
    log.info("resuming %s shot %d of %d from %s", "inside" if live else "after", start, opts.shots, partial)
    del model
    model = load(str(partial / (runstate.LIVE if live else f"shot-{start}"))).model.to(device)
    return _Run(opts, group, model, tok, plan.Plan.from_json(state["plan"]), Record.from_json(state["report"]), partial,
                start, state, bool(live))


def _begin(opts: PruneOptions, group, model, tok, path: Path, calib: torch.Tensor, seconds: dict) -> _Run:
    """A fresh run: the dense model's plan (keeps everything) and record."""
    report = Record.begin(opts.fingerprint(), opts.model, path, model.config.model_type,
                          Calibration.of(opts.calib, calib), _shape_summary(model))
    kept = plan.Plan.dense(layer_shapes(model.config), {"model": opts.model, "model_type": model.config.model_type},
                           report.made())
    run = _Run(opts, group, model, tok, kept, report, runstate.partial_dir(opts.out))
    if run.main:
        shutil.rmtree(run.partial, ignore_errors=True)
    if group is not None:
        report.recovery.distributed = {"processes": group.world, "backend": group.backend, "sharding": opts.sharding}
    if opts.plan:
        run.replay = plan.Plan.load(Path(opts.plan))
        run.replay.check_source(layer_shapes(model.config), f"--plan {opts.plan}")
        report.replayed = {"plan": opts.plan, "made_from": run.replay.source.get("model")}
        run.kept.made = run.replay.made
    if opts.eval and run.main:
        t = time.perf_counter()
        report.evaluation.before = _eval(model, tok, opts).as_dict()
        seconds["eval_before"] = time.perf_counter() - t
    return run


def _shot(run: _Run, shot: int, calib: torch.Tensor, budget: int, teacher, data, val) -> None:
    """Cut (or replay the plan's cut), recover, checkpoint."""
    opts, group = run.opts, run.group
    resuming = run.live and shot == run.start
    if resuming:  # cut already, recovery under way
        record = Shot.from_json(run.state["record"])
    else:
        record = Shot(shot + 1)
        if run.replay is not None:
            run.model = _replay(run, run.replay, record, calib)
        else:
            if shot == 0 and opts.drop_layers:
                run.model = _drop_layers(run.model, calib, opts, run.kept, record)
            run.model = _cut(run.model, calib, shot, opts, run.kept, record, group)
    if budget > 0:
        world = group.world if group is not None else 1
        steps = max(1, budget // (opts.seq_len * opts.batch_size * world))
        save = runstate.live_saver(run.partial, run.model, run.tok, run.state_of(shot=shot + 1, record=record.to_json()),
                                   group)
        run.model, record.recovery = recovery.train(
            run.model, data, steps, recovery_options(opts), teacher=teacher, val=val,
            desc=f"shot {shot + 1}/{opts.shots} recovery ({opts.recovery})", group=group, sharding=opts.sharding,
            resume=run.partial / runstate.LIVE if resuming else None, save=save)
    run.report.shots.append(record)
    t = time.perf_counter()
    if run.main:
        runstate.checkpoint(run.partial, shot + 1, run.model, run.tok,
                            run.state_of(**({"data": data.state()} if data else {})))
        shutil.rmtree(run.partial / runstate.LIVE, ignore_errors=True)
    runstate.wait(group)
    record.checkpoint_seconds = time.perf_counter() - t


def _finish(run: _Run, seconds: dict) -> Record:
    """Measure, write the output directory (process 0), return the record."""
    report, opts = run.report, run.opts
    if opts.eval and run.main:
        t = time.perf_counter()
        report.evaluation.after = _eval(run.model, run.tok, opts).as_dict()
        seconds["eval_after"] = time.perf_counter() - t
    shots = report.shots
    seconds |= {"salience": sum(s.salience_seconds or 0.0 for s in shots),
                "surgery": sum(s.surgery_seconds or 0.0 for s in shots),
                "recovery": sum((s.recovery or {}).get("seconds", 0.0) for s in shots)}
    report.finish(_shape_summary(run.model), run.kept.to_json(), seconds)
    if run.main:
        with atomic_dir(opts.out, opts.force) as tmp:
            save(tmp, run.model, run.tok)
            report.write(tmp)
            if opts.imatrix and importance.is_gguf(Path(opts.imatrix)):  # the pruned model's, for export --imatrix
                importance.cut_to(Path(opts.imatrix), tmp / "imatrix.gguf", run.kept.layer_plans(),
                                  head_dim(run.model.config), "cut to the kept columns by transact-edge prune "
                                  "(approximate: sums of the dense model's inputs)")
        shutil.rmtree(run.partial, ignore_errors=True)
    runstate.wait(run.group)
    return report


def _replay(run: _Run, replay: plan.Plan, record: Shot, calib: torch.Tensor):
    """The saved plan's cut, applied to this model of the same shapes: no scores, and no calibration
    unless the cut is refit."""
    t = time.perf_counter()
    model = run.model
    if replay.dropped():
        model = depth.drop(model, replay.dropped())
        run.kept.drop_layers(replay.dropped())
        record.depth = {"dropped": replay.dropped(), "replayed": True}
    plans = replay.layer_plans()
    if run.opts.reconstruct:
        log.info("--plan with --reconstruct: calibrating on %d windows of %r for the refit", calib.shape[0],
                 run.opts.calib)
        _refit(model, plans, calib, run.opts, run.group, record)
    model = cut(model, plans, consume=True)
    run.kept.apply(plans)
    record.replayed, record.surgery_seconds = True, time.perf_counter() - t
    record.widths = [p.shape.as_dict() for p in plans]
    log.info("replayed %s: %s", run.opts.plan, widths_line([p.shape for p in plans]))
    return model


def _refit(model, plans: list[plan.LayerPlan], calib: torch.Tensor, opts: PruneOptions,
           group: distributed.Group | None, record: Shot) -> None:
    """--reconstruct: refit the kept columns of o_proj and down_proj before the cut takes them."""
    record.refit = refit.refit(model, plans, calib, head_dim(model.config), opts.batch_size, group)
    modules = [m for layer in record.refit["layers"] for m in layer.values() if "nothing_cut" not in m]
    chosen = [m["ridge"] for m in modules]
    log.info("refit %d of %d cut modules in %.0f s (ridge strengths %s)", sum(r is not None for r in chosen), len(chosen),
             record.refit["seconds"], sorted({r for r in chosen if r is not None}))


def _drop_layers(model, calib: torch.Tensor, opts: PruneOptions, kept: plan.Plan, record: Shot):
    """ShortGPT depth pruning: the layers of least block influence go before any width is cut."""
    t = time.perf_counter()
    influence = depth.block_influence(model, calib, opts.batch_size)
    dropped = depth.choose(influence, opts.drop_layers)
    record.depth = {"block_influence": influence.tolist(), "dropped": [kept.layers[il] for il in dropped],
                    "seconds": time.perf_counter() - t}
    kept.drop_layers(dropped)
    log.info("dropped layers %s (least block influence)", record.depth["dropped"])
    return depth.drop(model, dropped)


def _cut(model, calib: torch.Tensor, shot: int, opts: PruneOptions, kept: plan.Plan, record: Shot,
         group: distributed.Group | None):
    """Score the current model and cut it one shot closer to the final widths."""
    shapes = layer_shapes(model.config)
    final = plan.target(_widest(kept.dense_shapes()), opts.widths, head_dim(model.config))
    uniform = plan.step(_widest(shapes), final, opts.shots - shot, opts.widths.round_to)
    t = time.perf_counter()
    if opts.imatrix:
        scores = salience.from_stats(importance.stats(Path(opts.imatrix), model.config), shapes)
        record.salience_from = opts.imatrix
    else:
        scores = salience.METRICS[opts.metric](model, calib, shapes, opts.batch_size, opts.seed * 1000 + shot,
                                               group=group)
    record.salience_seconds = time.perf_counter() - t
    record.salience_tokens_per_s = calib.numel() / record.salience_seconds
    new_shapes = (plan.per_layer_widths(scores, shapes, uniform, opts.widths.round_to) if opts.per_layer
                  else [uniform] * len(shapes))
    plans = plan.select(scores, shapes, new_shapes)
    if opts.reconstruct:
        _refit(model, plans, calib, opts, group, record)
    t = time.perf_counter()
    model = cut(model, plans, consume=True)
    record.surgery_seconds = time.perf_counter() - t
    kept.apply(plans)
    record.widths = [s.as_dict() for s in new_shapes]
    record.row_lengths = plan.row_lengths(new_shapes, head_dim(model.config))  # what quantizer blocks must divide
    record.salience = [{"metric": opts.metric, "heads": h.tolist(), "kv_groups": g.tolist(),
                           "mlp_channels": salience.summary(c)}
                          for h, g, c in zip(scores.heads, scores.groups, scores.channels)]
    log.info("shot %d/%d: %s", shot + 1, opts.shots, widths_line(new_shapes))
    return model


def _prune_streamed(opts: PruneOptions) -> Record:
    """One TransAct shot, layer by layer from a safetensors directory (models larger than memory)."""
    from transact_edge.stream import prune_streamed

    unsupported = {"--shots": opts.shots != 1, "--train-tokens": opts.train_tokens != 0,
                   "--metric": opts.metric != "acts", "--resume": opts.resume, "--eval": opts.eval}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise UserError(f"--stream does one TransAct shot without recovery or evaluation; drop {', '.join(bad)}")
    path = resolve(opts.model)
    if not path.is_dir():
        raise UserError(f"--stream reads a Hugging Face safetensors directory, not {path}")
    config = read_config(opts.model)
    plan.target(_widest(layer_shapes(config)), opts.widths, head_dim(config))
    tok = load_tokenizer(path)
    windows = corpus.windows(corpus.stream(tok, opts.calib, "train"), opts.seq_len, opts.calib_samples)
    return prune_streamed(path, opts, windows)


def _eval(model, tok, opts: PruneOptions):
    ids = corpus.stream(tok, corpus.DEFAULT, "eval")
    return perplexity(model, ids, window=512, max_tokens=opts.eval_tokens, batch_size=opts.batch_size,
                      text="shipped Wikipedia held-out pages")
