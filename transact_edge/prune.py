"""The TransAct driver: load -> (calibrate -> score -> cut -> recover -> checkpoint) x shots -> save.

Shen et al., "Pruning Large Language Models to Intra-module Low-rank Architecture with
Transitional Activations", ACL Findings 2024 (arXiv 2407.05690). Example:
    transact-edge prune --model smollm2-135m --kv-heads 2 --mlp-ratio 0.5 --shots 2 --out pruned/
Each finished shot is checkpointed in a hidden sibling of the output (`.NAME.partial/shot-K`);
`--resume` continues after the last one. The output appears only when everything is done.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import corpus, depth, distill, distributed, generate, plan, recovery, salience, traindata
from .checkpoint import atomic_dir, check_output, save
from .errors import UserError
from .evaluate import perplexity
from .loading import EMBEDDED, load, read_config, resolve
from .shapes import head_dim, is_uniform, kv_bytes_per_token, count_params, layer_shapes
from .surgery import cut

log = logging.getLogger(__name__)


@dataclass
class PruneOptions:
    model: str
    out: Path
    widths: plan.WidthRequest = field(default_factory=plan.WidthRequest)
    per_layer: bool = False          # widths may differ per layer (allocation rule in plan.py)
    metric: str = "acts"             # salience.METRICS: acts (TransAct), magnitude, taylor, random
    stream: bool = False             # layer by layer from the files, bounded memory (stream.py)
    shots: int = 1                   # iterative pruning steps; reference: 8
    train_tokens: int = 0            # recovery tokens over all shots; 0 = pruning only
    schedule: str = "linear"         # how the tokens are spread over the shots (recovery.SCHEDULES)
    recovery: str = "kd"             # kd: distil from the teacher (distill.py); lm: LM loss on the data
    kd_temperature: float = 1.0
    kd_alpha: float = 0.0            # weight of an added LM loss in kd mode
    teacher: str | None = None       # default: the dense source model
    train_data: str | None = None    # traindata.py spec; default: the calibration corpus
    gen_tokens: int = 0              # tokens sampled from the teacher for the `generated` source
    gen_len: int = 256               # tokens sampled per generated sequence
    val_windows: int = 8             # held-apart validation windows of the first training source
    val_every: int = 0               # steps between validation losses (0: 20 per shot)
    drop_layers: int = 0             # depth pruning (ShortGPT block influence) before the first shot
    calib: str = corpus.DEFAULT      # 'wiki' (shipped) or a .txt/.jsonl/dataset directory
    calib_samples: int = 128         # calibration windows (reference: 128)
    seq_len: int = 2048              # tokens per window (reference: 4096)
    batch_size: int = 4              # windows per forward/training step
    lr: float = 1e-4                 # peak learning rate of recovery training
    seed: int = 0
    eval: bool = False               # perplexity before and after on the held-out text
    eval_tokens: int | None = None   # cap on held-out tokens scored (None: all)
    resume: bool = False
    force: bool = False
    device: str = "auto"
    sharding: str = "ddp"            # recovery under a launcher (distributed.py): ddp or fsdp
    checkpoint_minutes: float = 5.0  # recovery state saved at least this often inside a shot
    gen_batch: int = 0               # sequences sampled at once (0: automatic)

    def fingerprint(self) -> dict:
        """What must match for --resume to continue a run."""
        d = asdict(self)
        for k in ("resume", "force", "device", "sharding", "eval", "eval_tokens", "out", "checkpoint_minutes",
                  "gen_batch"):
            d.pop(k)
        return json.loads(json.dumps(d, default=str))


def _shape_summary(model) -> dict:
    shapes = layer_shapes(model.config)
    return {"layers": [s.as_dict() for s in shapes], "uniform": is_uniform(shapes), "head_dim": head_dim(model.config),
            "params": count_params(model), "kv_bytes_per_token_f16": kv_bytes_per_token(shapes, head_dim(model.config))}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _validate(opts: PruneOptions) -> None:
    plan.check_request(opts.widths)
    if opts.shots < 1:
        raise UserError(f"--shots must be at least 1, got {opts.shots}")
    for name in ("calib_samples", "batch_size"):
        if getattr(opts, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(opts, name)}")
    if opts.train_tokens < 0:
        raise UserError(f"--train-tokens must be >= 0, got {opts.train_tokens}")
    if opts.metric not in salience.METRICS:
        raise UserError(f"unknown --metric {opts.metric!r} (choose from {', '.join(salience.METRICS)})")
    if opts.sharding not in distributed.SHARDING:
        raise UserError(f"unknown --sharding {opts.sharding!r} (choose from {', '.join(distributed.SHARDING)})")
    if opts.schedule not in recovery.SCHEDULES:
        raise UserError(f"unknown --schedule {opts.schedule!r} (choose from {', '.join(recovery.SCHEDULES)})")
    distill.check(_loss_options(opts))
    if opts.train_data is not None:  # (the default, the calibration corpus, is checked as calibration)
        if any(s.name == traindata.GENERATED for s in traindata.parse(opts.train_data)):
            generate.check(_gen_options(opts))
    if opts.teacher is not None and not Path(opts.teacher).exists() and opts.teacher not in EMBEDDED:
        raise UserError(f"--teacher {opts.teacher}: no such model directory or file")
    if opts.val_windows < 0 or opts.val_every < 0 or opts.drop_layers < 0:
        raise UserError("--val-windows, --val-every and --drop-layers must be >= 0")


def _widest(shapes):
    return max(shapes, key=lambda s: (s.n_head, s.ffn_dim))


def _partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _last_shot(partial: Path, opts: PruneOptions) -> tuple[int, dict] | None:
    """The last finished shot in `partial` and its state, if it belongs to the same run."""
    done = sorted((int(p.name.split("-")[1]), p) for p in partial.glob("shot-*") if (p / "state.json").is_file())
    if not done:
        return None
    shot, path = done[-1]
    return shot, _same_run(json.loads((path / "state.json").read_text()), partial, opts)


def _same_run(state: dict, partial: Path, opts: PruneOptions) -> dict:
    """`state`, if the checkpoint it came from was written by a run with these options."""
    if state["options"] != opts.fingerprint():
        raise UserError(f"{partial}: checkpoints of a run with other options; drop --resume to start over")
    return state


def check(opts: PruneOptions, processes: int = 1) -> None:
    """Everything about the options that can be refused before any weight is read."""
    _validate(opts)
    if opts.stream and processes > 1:
        raise UserError("--stream runs in one process; drop the launcher")
    check_output(opts.out, opts.force)
    config = read_config(opts.model)
    if config is not None:
        plan.target(_widest(layer_shapes(config)), opts.widths)
        if opts.drop_layers:
            depth.check(opts.drop_layers, config.num_hidden_layers)


def _loss_options(opts: PruneOptions) -> distill.LossOptions:
    return distill.LossOptions(opts.recovery, opts.kd_temperature, opts.kd_alpha)


def _gen_options(opts: PruneOptions) -> generate.GenOptions:
    return generate.GenOptions(opts.gen_tokens, seed=opts.seed, new_len=opts.gen_len, batch=opts.gen_batch)


def _needs_teacher(opts: PruneOptions, sources: list[traindata.Source]) -> bool:
    return opts.train_tokens > 0 and (opts.recovery == "kd" or any(s.name == traindata.GENERATED for s in sources))


def _recovery_setup(opts: PruneOptions, student, tok, calib_ids: torch.Tensor, device: torch.device,
                    group: distributed.Group | None, report: dict):
    """The teacher (frozen, once per process), the training mixture and the held-apart validation windows."""
    sources = traindata.parse(opts.train_data or opts.calib)
    teacher = None
    if _needs_teacher(opts, sources):
        teacher = distill.Teacher(load(opts.teacher or opts.model).model, device)
        teacher.check_student(student)  # before any shot or sampling, not after the first one
    streams = []
    for src in sources:
        if src.name == traindata.GENERATED:
            if group is not None and not group.main:
                _wait(group)  # process 0 samples (or finds the cache); the others then read its file
            path, stats = generate.ensure(teacher.model, calib_ids, tok.eos_token_id, _gen_options(opts))
            if group is not None and group.main:
                _wait(group)
            report.setdefault("generated", stats | {"file": str(path)})
            streams.append(traindata.TokenStream(src.name, opts.seq_len, tokens=path, seed=opts.seed))
        else:
            streams.append(traindata.TokenStream(src.name, opts.seq_len, tok, seed=opts.seed))
    data = traindata.Mixture(streams, [s.weight for s in sources], opts.seed)
    val = streams[0].hold_apart(opts.val_windows) if opts.val_windows else None
    return teacher, data, val


def prune(opts: PruneOptions) -> dict:
    """Run the whole schedule and write opts.out; returns the report also saved as transact.json.

    Started by a launcher (distributed.py), every process runs this with the same options.
    """
    check(opts, distributed.launched_processes())
    if opts.stream:
        return _prune_streamed(opts)
    group = distributed.join(opts.device)
    try:
        return _prune(opts, group)
    finally:
        distributed.leave()


def _prune(opts: PruneOptions, group: distributed.Group | None) -> dict:
    main = group is None or group.main
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    loaded = load(opts.model)
    device = group.device if group is not None else resolve_device(opts.device)
    model, tok = loaded.model.to(device), loaded.tokenizer
    dense_shapes = layer_shapes(model.config)
    final = plan.target(_widest(dense_shapes), opts.widths)
    train_ids = corpus.stream(tok, opts.calib, "train")
    calib = corpus.windows(train_ids, opts.seq_len, opts.calib_samples)  # the same windows every shot
    seconds["load"] = time.perf_counter() - t

    partial = _partial_dir(opts.out)
    resumed = _last_shot(partial, opts) if opts.resume and partial.is_dir() else None
    live = _live(partial, opts) if opts.resume else None
    if live and resumed and live[0] < resumed[0]:  # stopped between a shot's checkpoint and clearing its live state
        live = None
    if resumed or live:
        start, state = live if live else resumed
        log.info("resuming %s shot %d of %d from %s", "inside" if live else "after", start, opts.shots, partial)
        del model
        model = load(str(partial / (LIVE if live else f"shot-{start}"))).model.to(device)
        lineage = plan.Lineage(**state["lineage"])
        report = state["report"]
    else:
        if main:
            shutil.rmtree(partial, ignore_errors=True)
        start, state = 0, {}
        lineage = plan.Lineage.dense(dense_shapes)
        report = {
            "format": "transact-edge/1",
            "source": {"model": opts.model, "path": str(loaded.path), "model_type": model.config.model_type},
            "options": opts.fingerprint(),
            "calibration": {"corpus": opts.calib, "windows": int(calib.shape[0]), "seq_len": opts.seq_len,
                            "tokens": int(calib.numel())},
            "dense": _shape_summary(model),
            "shots": [],
            "seconds": {},
        }
        if group is not None:
            report["distributed"] = {"processes": group.world, "backend": group.backend, "sharding": opts.sharding}
        if opts.eval and main:
            t = time.perf_counter()
            report["perplexity_before"] = _eval(model, tok, opts).as_dict()
            seconds["eval_before"] = time.perf_counter() - t
    teacher = data = val = None
    if opts.train_tokens > 0:
        t = time.perf_counter()
        teacher, data, val = _recovery_setup(opts, model, tok, train_ids, device, group, report)
        if "data" in state:
            data.restore(state["data"])
        seconds["recovery_setup"] = time.perf_counter() - t
    budgets = recovery.tokens_per_shot(opts.train_tokens, opts.shots, opts.schedule)

    for shot in range(start, opts.shots):
        if live and shot == start:  # cut already, recovery under way
            record = state["record"]
        else:
            record = {"shot": shot + 1}
            if shot == 0 and opts.drop_layers:
                model = _drop_layers(model, calib, opts, lineage, record)
            model = _cut(model, calib, final, shot, opts, lineage, record, group)
        if budgets[shot] > 0:
            world = group.world if group is not None else 1
            steps = max(1, budgets[shot] // (opts.seq_len * opts.batch_size * world))
            model, record["recovery"] = recovery.train(
                model, data, steps, _recovery_options(opts), teacher=teacher, val=val,
                desc=f"shot {shot + 1}/{opts.shots} recovery ({opts.recovery})", group=group,
                sharding=opts.sharding, resume=partial / LIVE if live and shot == start else None,
                save=_live_saver(partial, model, tok, opts, lineage, report, record, shot + 1, group))
        report["shots"].append(record)

        t = time.perf_counter()
        if main:
            _checkpoint(partial, shot + 1, model, tok, {"options": opts.fingerprint(), "lineage": asdict(lineage),
                                                        "report": report} | ({"data": data.state()} if data else {}))
            shutil.rmtree(partial / LIVE, ignore_errors=True)
        _wait(group)
        record["checkpoint_seconds"] = time.perf_counter() - t

    report["pruned"] = _shape_summary(model)
    report["kept"] = asdict(lineage) | {"numbering": "indices in the source model"}
    del report["kept"]["shots"]
    if opts.eval and main:
        t = time.perf_counter()
        report["perplexity_after"] = _eval(model, tok, opts).as_dict()
        seconds["eval_after"] = time.perf_counter() - t
    stage = lambda key: sum(s.get(key, 0.0) for s in report["shots"])  # noqa: E731
    seconds |= {"salience": stage("salience_seconds"), "surgery": stage("surgery_seconds"),
                "recovery": sum(s.get("recovery", {}).get("seconds", 0.0) for s in report["shots"])}
    report["seconds"] = report.get("seconds", {}) | seconds
    if main:
        with atomic_dir(opts.out, opts.force) as tmp:
            save(tmp, model, tok, report)
        shutil.rmtree(partial, ignore_errors=True)
    _wait(group)
    return report


def _recovery_options(opts: PruneOptions) -> recovery.RecoveryOptions:
    return recovery.RecoveryOptions(_loss_options(opts), opts.batch_size, opts.lr, opts.val_every,
                                    opts.checkpoint_minutes * 60)


def _drop_layers(model, calib: torch.Tensor, opts: PruneOptions, lineage: plan.Lineage, record: dict):
    """ShortGPT depth pruning: the layers of least block influence go before any width is cut."""
    t = time.perf_counter()
    influence = depth.block_influence(model, calib, opts.batch_size)
    dropped = depth.choose(influence, opts.drop_layers)
    record["depth"] = {"block_influence": influence.tolist(), "dropped": [lineage.layers[il] for il in dropped],
                       "seconds": time.perf_counter() - t}
    lineage.drop_layers(dropped)
    log.info("dropped layers %s (least block influence)", record["depth"]["dropped"])
    return depth.drop(model, dropped)


def _cut(model, calib: torch.Tensor, final, shot: int, opts: PruneOptions, lineage: plan.Lineage, record: dict,
         group: distributed.Group | None):
    """Score the current model and cut it one shot closer to the final widths."""
    shapes = layer_shapes(model.config)
    uniform = plan.step(_widest(shapes), final, opts.shots - shot, opts.widths.round_to)
    t = time.perf_counter()
    scores = salience.METRICS[opts.metric](model, calib, shapes, opts.batch_size, opts.seed * 1000 + shot,
                                           group=group)
    record["salience_seconds"] = time.perf_counter() - t
    record["salience_tokens_per_s"] = calib.numel() / record["salience_seconds"]
    new_shapes = (plan.per_layer_widths(scores, shapes, uniform, opts.widths.round_to) if opts.per_layer
                  else [uniform] * len(shapes))
    plans = plan.select(scores, shapes, new_shapes)
    t = time.perf_counter()
    model = cut(model, plans, consume=True)
    record["surgery_seconds"] = time.perf_counter() - t
    lineage.apply(plans)
    record["widths"] = [s.as_dict() for s in new_shapes]
    record["salience"] = [{"metric": opts.metric, "heads": h.tolist(), "kv_groups": g.tolist(),
                           "mlp_channels": salience.summary(c)}
                          for h, g, c in zip(scores.heads, scores.groups, scores.channels)]
    log.info("shot %d/%d: %s", shot + 1, opts.shots, _widths_line(new_shapes))
    return model


LIVE = "live"  # the training state inside a shot, in the partial directory


def _live(partial: Path, opts: PruneOptions) -> tuple[int, dict] | None:
    """(shot, state) of a recovery that was stopped inside a shot, if it belongs to this run."""
    path = partial / LIVE / "state.json"
    if not path.is_file():
        return None
    state = _same_run(json.loads(path.read_text()), partial, opts)
    return state["shot"] - 1, state


def _live_saver(partial: Path, model, tok, opts: PruneOptions, lineage: plan.Lineage, report: dict, record: dict,
                shot: int, group: distributed.Group | None):
    """The callback through which recovery hands over its state every --checkpoint-minutes."""
    config = model.config

    def save_live(write) -> None:
        if group is None or group.main:
            partial.mkdir(exist_ok=True)
            with atomic_dir(partial / LIVE, force=True) as tmp:
                write(tmp)
                config.save_pretrained(tmp)
                tok.save_pretrained(tmp)
                (tmp / "state.json").write_text(json.dumps({"shot": shot, "options": opts.fingerprint(),
                                                            "lineage": asdict(lineage), "report": report,
                                                            "record": record}))
        _wait(group)
    return save_live


def _wait(group: distributed.Group | None) -> None:
    """The other processes wait while process 0 writes."""
    if group is not None:
        group.barrier()


def _prune_streamed(opts: PruneOptions) -> dict:
    """One TransAct shot, layer by layer from a safetensors directory (models larger than memory)."""
    from transformers import AutoTokenizer

    from .stream import prune_streamed

    unsupported = {"--shots": opts.shots != 1, "--train-tokens": opts.train_tokens != 0,
                   "--metric": opts.metric != "acts", "--resume": opts.resume, "--eval": opts.eval}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise UserError(f"--stream does one TransAct shot without recovery or evaluation; drop {', '.join(bad)}")
    path = resolve(opts.model)
    if not path.is_dir():
        raise UserError(f"--stream reads a Hugging Face safetensors directory, not {path}")
    config = read_config(opts.model)
    plan.target(_widest(layer_shapes(config)), opts.widths)
    tok = AutoTokenizer.from_pretrained(path)
    windows = corpus.windows(corpus.stream(tok, opts.calib, "train"), opts.seq_len, opts.calib_samples)
    return prune_streamed(path, opts.out, opts.widths, windows, opts.batch_size, opts.per_layer)


def _eval(model, tok, opts: PruneOptions):
    ids = corpus.stream(tok, corpus.DEFAULT, "eval")
    return perplexity(model, ids, window=512, max_tokens=opts.eval_tokens, batch_size=opts.batch_size,
                      text="shipped Wikipedia held-out pages")


def _checkpoint(partial: Path, shot: int, model, tok, state: dict) -> None:
    partial.mkdir(exist_ok=True)
    final = partial / f"shot-{shot}"
    with atomic_dir(final, force=True) as tmp:
        save(tmp, model, tok)
        (tmp / "state.json").write_text(json.dumps(state))


def _widths_line(shapes) -> str:
    if is_uniform(shapes):
        s = shapes[0]
        return f"every layer: {s.n_head} heads / {s.n_kv_head} KV heads, MLP {s.ffn_dim}"
    return "per layer: " + " ".join(f"{s.n_kv_head}/{s.n_head}/{s.ffn_dim}" for s in shapes) + " (kv/heads/mlp)"
