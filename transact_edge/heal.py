"""What recovery needs before its first step: the teacher (frozen, loaded once per process), the
training mixture of --train-data (with the teacher's samples when `generated` is a source) and the
validation windows held apart from it."""
from __future__ import annotations

import torch

from transact_edge import distill, distributed, generate, runstate, traindata
from transact_edge.loading import load
from transact_edge.options import PruneOptions, gen_options
from transact_edge.record import Record


def needs_teacher(opts: PruneOptions, sources: list[traindata.Source]) -> bool:
    return opts.train_tokens > 0 and (opts.recovery == "kd" or any(s.name == traindata.GENERATED for s in sources))


def setup(opts: PruneOptions, student, tok, calib_ids: torch.Tensor, device: torch.device,
          group: distributed.Group | None, report: Record):
    """The teacher (frozen, once per process), the training mixture and the held-apart validation windows."""
    sources = traindata.parse(opts.train_data or opts.calib)
    teacher = None
    if needs_teacher(opts, sources):
        teacher = distill.Teacher(load(opts.teacher or opts.model).model, device)
        teacher.check_student(student)  # before any shot or sampling, not after the first one
    streams = []
    for src in sources:
        if src.name == traindata.GENERATED:
            if group is not None and not group.main:
                runstate.wait(group)  # process 0 samples (or finds the cache); the others then read its file
            path, stats = generate.ensure(teacher.model, calib_ids, tok.eos_token_id, gen_options(opts))
            if group is not None and group.main:
                runstate.wait(group)
            if report.recovery.generated is None:  # (a resumed run keeps the first sampling's)
                report.recovery.generated = stats | {"file": str(path)}
            streams.append(traindata.TokenStream(src.name, opts.seq_len, tokens=path, seed=opts.seed))
        else:
            streams.append(traindata.TokenStream(src.name, opts.seq_len, tok, seed=opts.seed))
    data = traindata.Mixture(streams, [s.weight for s in sources], opts.seed)
    val = streams[0].hold_apart(opts.val_windows) if opts.val_windows else None
    return teacher, data, val
