"""Who made a model and from what, as GGUF's `general.*` keys (gguf-py's Metadata, the keys model hubs
and llama.cpp front-ends show): name, basename, size label, license, languages; and for a pruned
model its source declared with the `general.base_model.*` keys, the convention for derived models.

The source's facts come from its GGUF's own `general.*` keys when the weights came from a GGUF (the
embedded SmolLM2), else from its Hugging Face directory (model card, config) through gguf-py's
Metadata.load, as llama.cpp's converter reads them.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from transact_edge.ggufmap import read_kv
from transact_edge.record import Record

BASE_FIELDS = ("name", "author", "version", "organization", "description", "url", "doi", "uuid", "repo_url")


def of_gguf(path: Path):
    """Metadata from a GGUF file's `general.*` keys."""
    from gguf.metadata import Metadata

    meta = Metadata()
    names = {f.name for f in fields(Metadata)}
    for key, value, *_ in read_kv(path, "general."):
        field = key.removeprefix("general.")
        if field in names:
            setattr(meta, field, value)
    return meta


def of_source(directory: Path | None, gguf_file: Path | None, params: int):
    """The metadata a model carries: its GGUF's keys, else its directory's model card and config."""
    from gguf.metadata import Metadata

    if gguf_file is not None:
        return of_gguf(gguf_file)
    return Metadata.load(None, directory if directory is not None and directory.is_dir() else None, None, params)


def for_export(directory: Path, source_gguf: Path | None, report: Record | None, params: int):
    """The metadata of the file written from `directory`: its own for a dense checkpoint; for a pruned
    one, the source's license and basename, its own size label, and the source as base model 0."""
    from gguf.utility import size_label

    label = size_label(params, 0, 0, 0)
    if report is None:
        meta = of_source(directory, source_gguf, params)
        meta.name = meta.name or directory.name
        meta.size_label = meta.size_label or label
        return meta
    source_name = report.source.model
    src = of_source(Path(report.source.path or source_name), source_gguf, 0)
    base = {k: getattr(src, k) for k in BASE_FIELDS if getattr(src, k) is not None} or {"name": source_name}
    meta = type(src)()  # a new record: sampling defaults and the like belong to the source's card
    meta.basename = src.basename or Path(source_name).name
    meta.name = f"{src.name or Path(source_name).name} TransAct {label}"
    meta.finetune, meta.size_label = "transact", label
    meta.license, meta.license_name, meta.license_link = src.license, src.license_name, src.license_link
    meta.languages, meta.base_models = src.languages, [base]
    meta.tags = sorted(set(src.tags or []) | {"transact", "pruned"})
    return meta
