"""Quality study (issue 6): does TransAct win at equal budget? Baselines, ablations, plots.

    pip install -e ".[bench]" && python benchmarks/quality.py [--scale cpu|gpu] [--device auto]

Every run prunes the embedded SmolLM2-135M with the project's own `prune()` at a stated parameter
budget, with the same calibration windows, the same recovery-token budget and seed for every
method, then scores held-out perplexity (shipped Wikipedia pages, window 512, disjoint windows, the
first --eval-tokens tokens) in PyTorch; the main rows are also exported to Q8_0 GGUF and scored by
llama.cpp on the same tokens. Runs are recorded one by one in the results JSON and skipped when
already there, so an interrupted study continues where it stopped.

Budgets (non-embedding parameters kept; SmolLM2 has 106.2M of them in 30 layers):
  50%: 2 KV groups x 3 query heads, MLP 672 (49.5%); 25%: 1 KV group x 3 heads, MLP 352 (25.5%).
Groups of runs:
  method    acts (TransAct) iterative (k shots) vs acts one-shot vs magnitude / taylor / random (k shots)
  calib     acts with 8 / 32 / 128 calibration windows
  grid      KV groups/heads {3/9, 2/6, 1/3} x MLP {384, 768, 1152} (the paper's Figure 8 analogue)
  matched   MHA vs MLP at ~50%: 3/9+512, 3/6+640, 3/3+768, 2/6+672, 1/3+864
            (3/3+768 vs 1/3+864 and 3/6+640 vs 2/6+672: query-head vs KV-group pruning, GQA)
  layout    uniform vs --per-layer widths at 50% and 25%
Writes benchmarks/results/quality-{scale}.{json,md} and quality-{scale}-*.png.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from transact_edge import corpus  # noqa: E402
from transact_edge.evaluate import perplexity  # noqa: E402
from transact_edge.loading import load  # noqa: E402
from transact_edge.plan import WidthRequest  # noqa: E402
from transact_edge.prune import PruneOptions, prune, resolve_device  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# What "about two hours on 2 CPU cores" allows, and a larger budget for a lent GPU.
SCALES = {
    "cpu": dict(shots=4, seq_len=256, calib_samples=32, train_tokens=8_192, eval_tokens=8_192, batch_size=4),
    "gpu": dict(shots=8, seq_len=1024, calib_samples=128, train_tokens=1_048_576, eval_tokens=None, batch_size=16),
}
HALF, QUARTER = (2, 6, 672), (1, 3, 352)


@dataclass(frozen=True)
class Run:
    group: str
    name: str
    widths: tuple[int, int, int]          # KV groups, query heads, MLP channels (every layer)
    metric: str = "acts"
    one_shot: bool = False
    calib_samples: int | None = None      # None: the scale's
    per_layer: bool = False
    llama_cpp: bool = False               # also score the Q8_0 GGUF in llama.cpp

    def key(self, scale: dict) -> str:
        """Identical settings share one run, whichever groups list them."""
        kv, h, f = self.widths
        return (f"{self.metric}-k{1 if self.one_shot else scale['shots']}-c{self.calib_samples or scale['calib_samples']}"
                f"-{kv}x{h}-{f}" + ("-pl" if self.per_layer else ""))


def runs() -> list[Run]:
    out = []
    for label, widths in (("50%", HALF), ("25%", QUARTER)):
        out += [Run(f"method {label}", "TransAct iterative", widths, llama_cpp=True),
                Run(f"method {label}", "TransAct one-shot", widths, one_shot=True, llama_cpp=True),
                Run(f"method {label}", "magnitude", widths, metric="magnitude", llama_cpp=True),
                Run(f"method {label}", "taylor", widths, metric="taylor", llama_cpp=True),
                Run(f"method {label}", "random", widths, metric="random", llama_cpp=True)]
    out += [Run("calib", f"{n} windows", HALF, calib_samples=n) for n in (8, 32, 128)]
    out += [Run("grid", f"{kv}/{h} + {f}", (kv, h, f)) for kv, h in ((3, 9), (2, 6), (1, 3)) for f in (384, 768, 1152)]
    out += [Run("matched", f"{kv}/{h} + {f}", (kv, h, f))
            for kv, h, f in ((3, 9, 512), (3, 6, 640), (3, 3, 768), (2, 6, 672), (1, 3, 864))]
    out += [Run("layout", f"{kind} {label}", w, per_layer=kind == "per-layer", llama_cpp=True)
            for label, w in (("50%", HALF), ("25%", QUARTER)) for kind in ("uniform", "per-layer")]
    return out


def run_one(r: Run, scale: dict, device: str, work: Path, eval_ids, seed: int) -> dict:
    kv, heads, mlp = r.widths
    start = time.time()
    opts = PruneOptions(model="smollm2-135m", out=work / r.key(scale), widths=WidthRequest(heads, kv, mlp, round_to=32),
                        per_layer=r.per_layer, metric=r.metric, shots=1 if r.one_shot else scale["shots"],
                        train_tokens=scale["train_tokens"], calib_samples=r.calib_samples or scale["calib_samples"],
                        seq_len=scale["seq_len"], batch_size=scale["batch_size"], seed=seed, force=True,
                        device=device)
    report = prune(opts).to_json()  # the record as transact.json holds it
    model = load(str(opts.out)).model.to(resolve_device(device))
    ppl = perplexity(model, eval_ids, window=512, max_tokens=scale["eval_tokens"], batch_size=scale["batch_size"])
    row = {"group": r.group, "name": r.name, **asdict(r), "key": r.key(scale), "options": opts.fingerprint(),
           "params": report["pruned"]["params"], "non_embedding_params": _non_embedding(report["pruned"]["params"]),
           "kv_bytes_per_token": report["pruned"]["kv_bytes_per_token_f16"],
           "widths_per_layer": report["pruned"]["layers"], "ppl": ppl.ppl, "protocol": ppl.protocol(),
           "recovery_loss_last": [s.get("recovery", {}).get("loss_last") for s in report["shots"]],
           "seconds": report["seconds"], "wall_seconds": time.time() - start}
    return row


EMBEDDING = 49152 * 576   # SmolLM2's tied token embedding / output head


def _non_embedding(params: int) -> int:
    return params - EMBEDDING


def _llama_cpp_ppl(checkpoint: Path, eval_ids, max_tokens: int | None) -> float:
    from transact_edge.exporters.gguf import GGUFExportOptions, export
    from transact_edge.llamacpp import open_gguf

    path = export(GGUFExportOptions(str(checkpoint), "q8_0", checkpoint.with_suffix(".q8_0.gguf")))
    rt = open_gguf(path, n_ctx=512)
    try:
        return perplexity(rt.batch_logits, eval_ids, window=512, max_tokens=max_tokens, batch_size=1).ppl
    finally:
        rt.llm.close()


def dense_row(scale: dict, eval_ids, device: str) -> dict:
    loaded = load("smollm2-135m")
    ppl = perplexity(loaded.model.to(resolve_device(device)), eval_ids, window=512, max_tokens=scale["eval_tokens"],
                     batch_size=scale["batch_size"])
    from transact_edge.shapes import count_params, head_dim, kv_bytes_per_token, layer_shapes
    params = count_params(loaded.model)
    return {"group": "dense", "name": "SmolLM2-135M", "params": params, "non_embedding_params": _non_embedding(params),
            "kv_bytes_per_token": kv_bytes_per_token(layer_shapes(loaded.model.config), head_dim(loaded.model.config)),
            "ppl": ppl.ppl, "protocol": ppl.protocol()}


# ---- report ----------------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    dense = result["dense"]
    s = result["scale"]
    lines = [f"# Quality study, scale `{result['scale_name']}` ({result['date']})", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; device {result['device']}. "
             f"Command: `{result['command']}`.", "",
             f"Budgets per run: {s['shots']} shots (one-shot: 1), {s['calib_samples']} calibration windows of "
             f"{s['seq_len']} tokens, {s['train_tokens']:,} recovery tokens (linear over the shots), batch "
             f"{s['batch_size']}, seed {result['seed']}. Perplexity: {dense['protocol']}.", "",
             f"Dense: {dense['params'] / 1e6:.1f}M parameters ({dense['non_embedding_params'] / 1e6:.1f}M "
             f"non-embedding), KV {dense['kv_bytes_per_token']:,} B/token, perplexity {dense['ppl']:.2f}.", ""]
    groups = list(dict.fromkeys(r["group"] for r in result["runs"]))
    for g in groups:
        lines += [f"## {g}", "", "| run | metric | shots | calib | KV/heads/MLP | non-emb params | KV B/token | "
                                 "ppl (torch) | ppl (llama.cpp Q8_0) |", "|---|---|---:|---:|---|---:|---:|---:|---:|"]
        for r in (r for r in result["runs"] if r["group"] == g):
            kv, h, f = r["widths"]
            llama = f"{r['ppl_llama_cpp_q8_0']:.2f}" if r.get("ppl_llama_cpp_q8_0") else "-"
            share = r["non_embedding_params"] / dense["non_embedding_params"]
            lines.append(f"| {r['name']} | {r['metric']} | {r['options']['shots']} | {r['options']['calib_samples']} | "
                         f"{kv}/{h}/{f}{' per-layer' if r['per_layer'] else ''} | "
                         f"{r['non_embedding_params'] / 1e6:.1f}M ({100 * share:.0f}%) | {r['kv_bytes_per_token']:,} | "
                         f"{r['ppl']:.2f} | {llama} |")
        lines.append("")
    return "\n".join(lines)


def plots(result: dict, stem: Path) -> list[Path]:
    """The PNGs written beside `stem`: perplexity vs size, the width grid, the per-layer widths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = [_pareto_plot(plt, result, stem.with_name(stem.name + "-pareto.png"))]
    grid = [r for r in result["runs"] if r["group"] == "grid"]
    if grid:
        written.append(_grid_plot(plt, grid, stem.with_name(stem.name + "-grid.png")))
    layout = [r for r in result["runs"] if r["per_layer"]]
    if layout:
        written.append(_layout_plot(plt, layout, stem.with_name(stem.name + "-per-layer.png")))
    return written


def _pareto_plot(plt, result: dict, path: Path) -> Path:
    runs_, dense = result["runs"], result["dense"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, label in ((axes[0], "non_embedding_params", "non-embedding parameters (M)"),
                           (axes[1], "kv_bytes_per_token", "KV-cache bytes per token (f16)")):
        for g in dict.fromkeys(r["group"] for r in runs_):
            pts = [r for r in runs_ if r["group"] == g]
            ax.scatter([r[key] / (1e6 if key != "kv_bytes_per_token" else 1) for r in pts], [r["ppl"] for r in pts],
                       label=g, alpha=0.8)
        ax.scatter([dense[key] / (1e6 if key != "kv_bytes_per_token" else 1)], [dense["ppl"]], marker="*", s=200,
                   c="k", label="dense")
        ax.set(xlabel=label, ylabel="held-out perplexity", yscale="log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M pruned: perplexity vs size (scale {result['scale_name']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _grid_plot(plt, grid: list[dict], path: Path) -> Path:
    import numpy as np

    attn = sorted({tuple(r["widths"][:2]) for r in grid}, reverse=True)
    mlps = sorted({r["widths"][2] for r in grid})
    z = np.full((len(attn), len(mlps)), np.nan)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for r in grid:
        i, j = attn.index(tuple(r["widths"][:2])), mlps.index(r["widths"][2])
        z[i, j] = r["ppl"]
        ax.text(j, i, f"{r['ppl']:.1f}\n{r['non_embedding_params'] / 1e6:.0f}M", ha="center", va="center",
                fontsize=9, color="w")
    im = ax.imshow(np.log(z), cmap="viridis_r")
    ax.set(xticks=range(len(mlps)), xticklabels=mlps, yticks=range(len(attn)),
           yticklabels=[f"{kv} KV / {h} heads" for kv, h in attn], xlabel="MLP channels per layer",
           title="perplexity (and non-embedding params)")
    fig.colorbar(im, ax=ax, label="log perplexity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _layout_plot(plt, layout: list[dict], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    for r in layout:
        layers = r["widths_per_layer"]
        axes[0].plot([l["n_kv_head"] for l in layers], marker="o", label=r["name"])
        axes[1].plot([l["ffn_dim"] for l in layers], marker="o", label=r["name"])
    axes[0].set(xlabel="layer", ylabel="KV groups kept")
    axes[1].set(xlabel="layer", ylabel="MLP channels kept")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("--per-layer widths chosen by activation salience")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="cpu", choices=SCALES)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", help="run only the groups whose name starts with this (e.g. 'method')")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp Q8_0 rows (no llama-cpp-python)")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "transact_edge" / "quality")
    ap.add_argument("--out", type=Path, help="default: benchmarks/results/quality-{scale}")
    a = ap.parse_args()
    scale, out = SCALES[a.scale], a.out or RESULTS / f"quality-{a.scale}"
    a.work.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    result = json.loads(path.read_text()) if path.is_file() else {}
    if result.get("scale") != scale or result.get("seed") != a.seed:
        result = {"scale_name": a.scale, "scale": scale, "seed": a.seed, "runs": []}
    result |= {"date": time.strftime("%Y-%m-%d", time.gmtime()), "machine": machine(), "device": a.device,
               "command": "python benchmarks/quality.py " + " ".join(sys.argv[1:])}
    loaded = load("smollm2-135m")
    eval_ids = corpus.stream(loaded.tokenizer, corpus.DEFAULT, "eval")
    del loaded
    if "dense" not in result:
        result["dense"] = dense_row(scale, eval_ids, a.device)
    done = {r["key"]: r for r in result["runs"]}
    todo = [r for r in runs() if not a.only or r.group.startswith(a.only)]
    with_llama = {r.key(scale) for r in todo if r.llama_cpp and not a.no_llama_cpp}
    for i, r in enumerate(todo):
        key = r.key(scale)
        if key not in done:
            print(f"[quality] {i + 1}/{len(todo)} {r.group}: {r.name} ({key})", file=sys.stderr, flush=True)
            done[key] = run_one(r, scale, a.device, a.work, eval_ids, a.seed)
        if key in with_llama and "ppl_llama_cpp_q8_0" not in done[key] and (a.work / key).is_dir():
            done[key]["ppl_llama_cpp_q8_0"] = _llama_cpp_ppl(a.work / key, eval_ids, scale["eval_tokens"])
        shutil.rmtree(a.work / key, ignore_errors=True)  # ~350 MB each; the JSON keeps what matters
        (a.work / key).with_suffix(".q8_0.gguf").unlink(missing_ok=True)
        row = dict(done[key], group=r.group, name=r.name, per_layer=r.per_layer, llama_cpp=r.llama_cpp)
        result["runs"] = [x for x in result["runs"] if (x["group"], x["name"]) != (r.group, r.name)] + [row]
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(path)
    out.with_suffix(".md").write_text(markdown(result))
    plots(result, out)
    print(markdown(result))


if __name__ == "__main__":
    main()
