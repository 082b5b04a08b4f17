"""The record of a prune (`transact.json`): what was pruned, as asked, how, into which shapes, and what
it cost. One typed record, built the same way by the in-memory and the streamed prune, written as JSON
under a versioned schema and read back by fields (export, provenance, inspect, replay, the CLI).

No torch here, so readers such as `inspect` stay light. The JSON keys are those of the earlier formats
(`dense`, `pruned`, `shots`, `seconds`, ...), so scripts reading the file as JSON keep working:
- transact-edge/3: this record; the streamed prune's `options` are the same fingerprint as in memory.
- transact-edge/2: the same keys; a streamed prune wrote 6 hand-picked options (still read).
- transact-edge/1: the cut as `kept` instead of a replayable `plan` (still read: turned into a plan).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from transact_edge.errors import UserError

FILE = "transact.json"
SCHEMA = "transact-edge/3"
READ = ("transact-edge/1", "transact-edge/2", SCHEMA)


def _of(cls, d: dict):
    """A record section from its JSON object; keys it does not name are kept in `extra` (round trip)."""
    if not isinstance(d, dict):
        raise TypeError(f"{cls.__name__}: an object expected, got {type(d).__name__}")
    names = {f.name for f in fields(cls)}
    known = {k: v for k, v in d.items() if k in names and k != "extra"}
    if "extra" in names:
        known["extra"] = {k: v for k, v in d.items() if k not in names}
    return cls(**known)


def _json(section) -> dict:
    """A section as JSON: fields left unset (None) are absent, as they were in the earlier formats."""
    d = {f.name: getattr(section, f.name) for f in fields(section) if f.name != "extra"}
    return {k: v for k, v in d.items() if v is not None} | getattr(section, "extra", {})


@dataclass
class Source:
    """The dense model: as named on the command line, where it was read, its family."""
    model: str
    path: str | None = None
    model_type: str | None = None


@dataclass
class Calibration:
    """The windows salience (and the refit) saw."""
    windows: int
    seq_len: int | None = None
    tokens: int | None = None
    corpus: str | None = None

    @classmethod
    def of(cls, corpus: str, windows) -> "Calibration":
        """Of a (windows, seq_len) tensor of token ids."""
        return cls(int(windows.shape[0]), int(windows.shape[1]), int(windows.numel()), corpus)


@dataclass
class Shapes:
    """A model's widths (shapes.summary): per-layer LayerShape dicts, parameters, KV-cache bytes."""
    layers: list[dict]
    uniform: bool | None = None
    head_dim: int | None = None
    params: int | None = None
    kv_bytes_per_token_f16: int | None = None


@dataclass
class Shot:
    """One cut (or a replayed plan's) and the recovery after it. Dicts are as their stages return them
    (salience.summary, refit.refit, recovery.train, depth)."""
    shot: int
    widths: list[dict] | None = None
    row_lengths: list[dict] | None = None          # what quantizer blocks must divide, per layer
    salience: list[dict] | None = None
    salience_from: str | None = None               # --imatrix: the file whose sums ranked the cut
    salience_seconds: float | None = None
    salience_tokens_per_s: float | None = None
    surgery_seconds: float | None = None
    depth: dict | None = None                      # dropped layers (ShortGPT, or replayed)
    refit: dict | None = None                      # --reconstruct
    replayed: bool | None = None
    recovery: dict | None = None                   # recovery.train's record (loss, tokens, data, teacher, ...)
    checkpoint_seconds: float | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict) -> "Shot":
        return _of(cls, d)

    def to_json(self) -> dict:
        return _json(self)


@dataclass
class Recovery:
    """Of the whole run: the teacher's sampled tokens (`generated` source) and the launcher's processes."""
    generated: dict | None = None
    distributed: dict | None = None


@dataclass
class Evaluation:
    """Perplexity on the held-out text before and after (evaluate.Perplexity.as_dict), with --eval."""
    before: dict | None = None
    after: dict | None = None


@dataclass
class Timings:
    """Seconds per stage (load, salience, surgery, recovery, eval_*, total) and the streamed prune's peak RSS."""
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: float | None = None


# JSON key -> (section, field) of the sections whose fields sit at the top level of the file
_FLAT = {"generated": ("recovery", "generated"), "distributed": ("recovery", "distributed"),
         "perplexity_before": ("evaluation", "before"), "perplexity_after": ("evaluation", "after"),
         "seconds": ("timings", "seconds"), "peak_rss_mib": ("timings", "peak_rss_mib")}
_NESTED = {"source": Source, "calibration": Calibration, "dense": Shapes, "pruned": Shapes}


@dataclass
class Record:
    """transact.json. `options` is PruneOptions.fingerprint() (what --resume must match); `plan` is
    plan.Plan.to_json() (what was kept, replayable with --plan)."""
    source: Source
    options: dict[str, Any]
    calibration: Calibration
    dense: Shapes
    pruned: Shapes | None = None
    plan: dict | None = None
    shots: list[Shot] = field(default_factory=list)
    recovery: Recovery = field(default_factory=Recovery)
    evaluation: Evaluation = field(default_factory=Evaluation)
    timings: Timings = field(default_factory=Timings)
    replayed: dict | None = None                   # --plan: the file replayed and the model it was made from
    schema: str = SCHEMA                           # the file's `format`
    extra: dict = field(default_factory=dict)      # keys this version does not know, kept as read

    @classmethod
    def begin(cls, options: dict[str, Any], model: str, path: Path | str, model_type: str, calibration: Calibration,
              dense: dict) -> "Record":
        """A prune's record before its first cut: the one builder of the in-memory and the streamed prune."""
        return cls(Source(model, str(path), model_type), options, calibration, _of(Shapes, dense))

    def finish(self, pruned: dict, plan: dict, seconds: dict[str, float]) -> None:
        """The pruned shapes (shapes.summary), the plan and the stage times, once the last shot is done."""
        self.pruned, self.plan, self.schema = _of(Shapes, pruned), plan, SCHEMA  # (a resumed run's may be older)
        self.timings.seconds |= seconds

    def made(self) -> dict:
        """How the cut was chosen, as plan.Plan keeps it."""
        keys = ("metric", "shots", "seed", "per_layer", "drop_layers")
        return {k: self.options.get(k) for k in keys} | {"calibration": _json(self.calibration)}

    def to_json(self) -> dict:
        d: dict[str, Any] = {"format": self.schema, "source": _json(self.source), "options": self.options,
                             "calibration": _json(self.calibration), "dense": _json(self.dense),
                             "shots": [s.to_json() for s in self.shots]}
        d |= {k: getattr(getattr(self, sec), name) for k, (sec, name) in _FLAT.items()}
        d |= {"pruned": self.pruned and _json(self.pruned), "plan": self.plan, "replayed": self.replayed}
        return {k: v for k, v in d.items() if v is not None} | self.extra

    @classmethod
    def from_json(cls, d: dict) -> "Record":
        """Any format in READ; the first one's `kept` becomes a plan."""
        if not isinstance(d, dict):
            raise TypeError(f"a JSON object expected, got {type(d).__name__}")
        schema = d.get("format", READ[0])
        if schema not in READ:
            raise ValueError(f"format {schema!r} is not one this transact-edge reads ({', '.join(READ)})")
        d = dict(d)
        if "kept" in d and "plan" not in d:
            d["plan"] = _plan_of_first_format(d)
        if not isinstance(d["source"]["model"], str) or not isinstance(d["options"], dict):
            raise TypeError("source.model or options of the wrong type")
        sections = {k: _of(t, d[k]) for k, t in _NESTED.items() if d.get(k) is not None}
        sections["calibration"] = sections.get("calibration") or Calibration(0)
        flat = {sec: {name: d[k] for k, (s, name) in _FLAT.items() if s == sec and k in d}
                for sec in ("recovery", "evaluation", "timings")}
        known = {"format", "options", "plan", "shots", "replayed", "kept", *_NESTED, *_FLAT}
        return cls(**sections, options=d["options"], plan=d.get("plan"),
                   shots=[Shot.from_json(s) for s in d.get("shots", [])],
                   recovery=Recovery(**flat["recovery"]), evaluation=Evaluation(**flat["evaluation"]),
                   timings=Timings(**flat["timings"]), replayed=d.get("replayed"), schema=schema,
                   extra={k: v for k, v in d.items() if k not in known})

    def write(self, directory: Path) -> None:
        """transact.json in `directory` (a temporary one the caller publishes atomically)."""
        (directory / FILE).write_text(json.dumps(self.to_json(), indent=1))


def _plan_of_first_format(d: dict) -> dict:
    """transact-edge/1 kept the cut as `kept`: the plan (version 1) it describes."""
    kept, dense, options = d["kept"], d["dense"]["layers"], d.get("options", {})
    source = {k: d["source"].get(k) for k in ("model", "model_type")} | {"layers": dense}
    made = {k: options.get(k) for k in ("metric", "shots", "seed", "per_layer")} | {"calibration": d.get("calibration")}
    return {"version": 1, "numbering": "indices in the source model", "kv_heads": kept["kv_heads"],
            "heads": kept["heads"], "channels": kept["channels"],
            "layers": kept.get("layers") or list(range(len(dense))), "source": source, "made": made}


def read_file(path: Path) -> Record:
    """The record of a transact.json file; ValueError, KeyError or TypeError when it is not one."""
    try:
        return Record.from_json(json.loads(path.read_bytes()))
    except RecursionError as e:
        raise ValueError(str(e)) from None


def read(directory: Path) -> Record | None:
    """transact.json of a pruned checkpoint (None when absent); one line when it is not a record we wrote."""
    path = directory / FILE
    if not path.is_file():
        return None
    try:
        return read_file(path)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: not a transact.json report ({type(e).__name__}: {e})") from None
