"""A bench report as a markdown table (speed, roofline share, latency, KV cache, peak RSS), JSON or CSV."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict

from transact_edge.bench.facts import MIB
from transact_edge.bench.run import ModelRun, Report


def summary(r: ModelRun) -> dict:
    """Per model: KV cache as llama.cpp reported it vs the per-layer sum, peak RSS, bytes per token."""
    out = {"model": r.facts.name, "backend": r.backend, "peak_rss_mib": r.peak_rss_mib, "greedy": r.greedy,
           "rss_before_model_mib": r.rss_before_model_mib,
           "weight_bytes_per_token": r.facts.weight_bytes_per_token, "kv_bytes_per_token": r.facts.kv_bytes_per_token,
           "kv_ctx": None, "kv_mib_llama_cpp": None, "kv_mib_per_layer_sum": None}
    if r.kv:
        out["kv_ctx"] = r.kv["cells"]
        out["kv_mib_llama_cpp"] = r.kv["mib"]
        out["kv_mib_per_layer_sum"] = r.facts.kv_bytes_per_token * r.kv["cells"] / MIB
    return out


def render(report: Report, fmt: str) -> str:
    rows = [row for r in report.runs for row in r.rows]
    sums = [summary(r) for r in report.runs]
    if fmt == "json":
        return json.dumps({**{k: v for k, v in asdict(report).items() if k != "runs"},
                           "models": sums, "rows": rows}, indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        by_model = {s["model"]: s for s in sums}
        w = csv.DictWriter(buf, fieldnames=[*rows[0], *[k for k in sums[0] if k not in rows[0]]])
        w.writeheader()
        for row in rows:
            w.writerow({**by_model[row["model"]], **row})
        return buf.getvalue()
    label = " (emulated: qemu-user, times are not the hardware's)" if report.emulated else ""
    lines = [f"device {report.device} [{report.target}]{label}, {report.threads} threads, "
             f"read bandwidth {report.bandwidth_gbps:.1f} GB/s (membw), {report.date}", "",
             "| model | size | params | backend | threads | test | t/s | roofline t/s | of roofline |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        if row["latency_ms"]:
            continue
        roof = (f"{row['roofline_ts']:.1f} | {100 * row['roofline_share']:.0f}%" if row["roofline_ts"] else "- | -")
        lines.append(f"| {row['model']} | {row['size_mib']:.1f} MiB | {row['params_m']:.2f} M | {row['backend']} | "
                     f"{row['threads']} | {row['test']} | {row['ts_mean']:.2f} ± {row['ts_sd']:.2f} | {roof} |")
    latency = [row for row in rows if row["latency_ms"]]
    if latency:
        lines += ["", "| model | prefix + decode | latency ms | t/s |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {r['model']} | {r['test']} | {r['latency_ms']:.0f} | {r['ts_mean']:.2f} ± {r['ts_sd']:.2f} |"
                  for r in latency]
    lines += ["", "| model | KV MiB (llama.cpp) | per-layer sum MiB | @ ctx | KV bytes/token | weight bytes/token | "
                  "peak RSS MiB |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in sums:
        kv = (f"{s['kv_mib_llama_cpp']:.2f} | {s['kv_mib_per_layer_sum']:.2f} | {s['kv_ctx']}"
              if s["kv_ctx"] else "- | - | -")
        rss = f"{s['peak_rss_mib']:.0f}" if s["peak_rss_mib"] else "-"
        if s["rss_before_model_mib"]:
            rss += f" ({s['rss_before_model_mib']:.0f} before loading)"
        lines.append(f"| {s['model']} | {kv} | {s['kv_bytes_per_token']:,} | {s['weight_bytes_per_token']:,} | {rss} |")
    for r in report.runs:
        if r.greedy:
            verdict = "identical to" if r.greedy["identical"] else "DIFFERENT from"
            lines.append(f"\n{r.facts.name}: {r.greedy['tokens']} greedy tokens on {report.device} {verdict} this "
                         f"machine's: {r.greedy['device'][:80]!r}")
    return "\n".join(lines) + "\n"
