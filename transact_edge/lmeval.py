"""`transact-edge eval --lm-eval TASKS`: EleutherAI's lm-evaluation-harness on a checkpoint, offline.

Nothing is downloaded at run time: lm-eval's own tasks run only when their data is already in the
local Hugging Face datasets cache (HF_DATASETS_OFFLINE=1 is set); otherwise the error says so.
One task always works offline, built from the shipped held-out pages:

  transact_wiki_lastword  predict the last word of a held-out Wikipedia sentence from the text before
                          it (up to 400 characters), LAMBADA-style: accuracy of greedy agreement and
                          perplexity of the target word, 500 examples.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from transact_edge.errors import UserError

LOCAL_TASK = "transact_wiki_lastword"
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: " {{{{target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _lastword_docs(n: int = 500) -> list[dict]:
    """(context, last word) pairs from sentences of the held-out pages, deterministic."""
    from transact_edge.corpus import default_texts

    docs = []
    for page in default_texts("eval"):
        for m in re.finditer(r"[^.!?\n]{40,400}?\s([A-Za-z]{3,})[.!?]", page):
            context = page[max(0, m.start(1) - 400):m.start(1)].rstrip()
            if m.start(1) > 400:  # start at a word
                context = context.split(" ", 1)[-1]
            if len(context) > 60:
                docs.append({"context": context, "target": m.group(1)})
    step = max(1, len(docs) // n)
    return docs[::step][:n]


def _local_tasks(root: Path) -> Path:
    data = root / "wiki_lastword.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in _lastword_docs()))
    (root / f"{LOCAL_TASK}.yaml").write_text(TASK_YAML.format(name=LOCAL_TASK, data=data))
    return root


@functools.cache
def _task_manager(include: str | None):
    """lm-eval's task index with the local task, built once per process: it reads ~15K task files (~20 s)."""
    from lm_eval.tasks import TaskManager

    root = Path(tempfile.mkdtemp(prefix="transact-lmeval-"))
    atexit.register(shutil.rmtree, root, True)
    return TaskManager(include_path=[str(_local_tasks(root))] + ([include] if include else []))


def evaluate(model, tokenizer, tasks: list[str], limit: int | None, batch_size: int,
             include: Path | None = None) -> tuple[dict, str]:
    """lm-eval results and its markdown table for `tasks` on an in-memory transformers model."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.utils import make_table
    except ImportError:
        raise UserError("--lm-eval needs the lm-eval package (pip install lm-eval); task data must already be "
                        "in the local Hugging Face datasets cache, nothing is downloaded at run time") from None
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    manager = _task_manager(str(include) if include else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s): {', '.join(unknown)} (e.g. {LOCAL_TASK}, which runs offline)")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager,
                                          bootstrap_iters=0)
    except (ConnectionError, FileNotFoundError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"lm-eval could not load the data of {', '.join(tasks)} offline ({first}); "
                        "put it in the Hugging Face datasets cache first") from None
    return results, make_table(results)
