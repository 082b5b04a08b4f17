"""What `prune` is asked to do (the CLI parses into PruneOptions), checked before any weight is read,
and the option sets of the stages it drives (loss, sampling, recovery)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transact_edge import corpus, distill, distributed, generate, importance, plan, recovery, salience, traindata
from transact_edge.errors import UserError
from transact_edge.loading import EMBEDDED


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
    gen_cache: str = "preallocated"  # KV cache of sampling (generate.CACHES; speed only, the same tokens)
    plan: str | None = None          # a transact.json whose cut to replay (no calibration unless reconstruct)
    reconstruct: bool = False        # refit o_proj/down_proj's kept columns at each cut (refit.py)
    imatrix: str | None = None       # an importance matrix whose sums rank the cut (importance.py): no salience pass

    def fingerprint(self) -> dict:
        """What must match for --resume to continue a run."""
        d = asdict(self)
        for k in ("resume", "force", "device", "sharding", "eval", "eval_tokens", "out", "checkpoint_minutes",
                  "gen_batch", "gen_cache"):
            d.pop(k)
        return json.loads(json.dumps(d, default=str))


def validate(opts: PruneOptions) -> None:
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
    distill.check(loss_options(opts))
    if opts.train_data is not None:  # (the default, the calibration corpus, is checked as calibration)
        if any(s.name == traindata.GENERATED for s in traindata.parse(opts.train_data)):
            generate.check(gen_options(opts))
    if opts.teacher is not None and not Path(opts.teacher).exists() and opts.teacher not in EMBEDDED:
        raise UserError(f"--teacher {opts.teacher}: no such model directory or file")
    if opts.val_windows < 0 or opts.val_every < 0 or opts.drop_layers < 0:
        raise UserError("--val-windows, --val-every and --drop-layers must be >= 0")
    if opts.reconstruct and opts.stream:
        raise UserError("--reconstruct needs each layer's dense Gram matrices, which --stream's two passes do "
                        "not keep; drop --stream or --reconstruct")
    if opts.reconstruct and opts.calib_samples < 2:
        raise UserError("--reconstruct holds calibration windows apart to choose its ridge strength: "
                        f"--calib-samples must be at least 2, got {opts.calib_samples}")
    if opts.imatrix is not None:
        fixed = {"--shots": opts.shots != 1, "--drop-layers": opts.drop_layers != 0, "--metric": opts.metric != "acts",
                 "--stream": opts.stream, "--plan": opts.plan is not None}
        bad = [k for k, v in fixed.items() if v]
        if bad:
            raise UserError(f"--imatrix ranks the dense model's heads and channels for one TransAct cut; drop "
                            f"{', '.join(bad)}")
        importance.read_sizes(Path(opts.imatrix))  # a missing or unreadable file, before the model is loaded
    if opts.plan is not None:
        fixed = {"widths": opts.widths != plan.WidthRequest(round_to=opts.widths.round_to), "--per-layer": opts.per_layer,
                 "--shots": opts.shots != 1, "--drop-layers": opts.drop_layers != 0, "--metric": opts.metric != "acts",
                 "--stream": opts.stream}
        bad = [k for k, v in fixed.items() if v]
        if bad:
            raise UserError(f"--plan fixes what is kept; drop {', '.join(bad)}")


def loss_options(opts: PruneOptions) -> distill.LossOptions:
    return distill.LossOptions(opts.recovery, opts.kd_temperature, opts.kd_alpha)


def gen_options(opts: PruneOptions) -> generate.GenOptions:
    return generate.GenOptions(opts.gen_tokens, seed=opts.seed, new_len=opts.gen_len, batch=opts.gen_batch,
                               cache=opts.gen_cache)


def recovery_options(opts: PruneOptions) -> recovery.RecoveryOptions:
    return recovery.RecoveryOptions(loss_options(opts), opts.batch_size, opts.lr, opts.val_every,
                                    opts.checkpoint_minutes * 60)
