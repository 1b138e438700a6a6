"""Compose the compact summary of `benchmarks/gpu_check.sh` from its work directory.

Reads what the steps left there (steps.tsv, env.json, pytest's junit XML, the benchmarks' JSON)
and writes gpu_check_summary.txt and gpu_check_summary.json beside them; prints the text. Only
the standard library: it must run wherever the check ran, whatever else failed to import.

    python benchmarks/gpu_check_summary.py WORK_DIR --mode cuda --seconds 412
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path

SERVING_GOAL = 0.95  # of base decode throughput, bank adapters (DESIGN.md, issue #15)
COMPRESSION_GOAL_S = 300.0  # 1000 Mistral-7B adapters, all 32 layers
MISTRAL_LAYERS = 32


def load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def junit_counts(path: Path) -> dict | None:
    """passed / failed / errors / skipped of a pytest --junitxml file, None when absent or cut short."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    c = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return {"passed": c["tests"] - c["failures"] - c["errors"] - c["skipped"], "failed": c["failures"],
            "errors": c["errors"], "skipped": c["skipped"]}


def read_steps(work: Path) -> list[dict]:
    steps = []
    for line in (work / "steps.tsv").read_text().splitlines() if (work / "steps.tsv").exists() else []:
        n, name, status, seconds, note = (line.split("\t") + [""] * 5)[:5]
        step = {"step": int(n), "name": name, "status": status, "seconds": int(seconds or 0), "note": note}
        tests = junit_counts(work / f"step{n}.xml")
        if tests is not None:
            step["tests"] = tests
        steps.append(step)
    return steps


def fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def serving_section(doc: dict | None) -> tuple[list[str], dict]:
    if not doc or not doc.get("rows"):
        return ["decode throughput: no results"], {}
    a, rows = doc["args"], doc["rows"]
    configs = ["bank K=1", "bank K=8", "dense", "transformers+peft"]
    ns = sorted({r["n"] for r in rows})
    ratio = {(r["n"], r["config"]): r["ratio"] for r in rows}
    tok_s = {r["n"]: r["tok_s"] for r in rows if r["config"] == "base"}
    distinct = {r["n"]: r["distinct"] for r in rows if r["config"] == "bank K=1"}
    lines = [f"decode throughput / base, same run (llama hidden {a['hidden']}, inter {a['intermediate']}, "
             f"heads {a['heads']}/{a['kv_heads']}, {a['layers']} layers, {a['dtype']}, batch {a['batch']}, "
             f"dense rank {a['rank']}, bank rank {a['bank_rank']}):",
             f"  {'N':>5} {'distinct':>8} {'base tok/s':>11}" + "".join(f" {c:>9}" for c in ("bank K=1", "bank K=8",
                                                                                           "dense", "peft"))]
    for n in ns:
        lines.append(f"  {n:>5} {distinct.get(n, 0):>8} {fmt(tok_s.get(n), '.0f'):>11}"
                     + "".join(f" {fmt(ratio.get((n, c))):>9}" for c in configs))
    top = ns[-1]
    verdict = {c: ratio.get((top, c)) for c in ("bank K=1", "bank K=8")}
    goal = ", ".join(f"{c} {fmt(v)} {'met' if v is not None and v >= SERVING_GOAL else 'NOT met'}"
                     for c, v in verdict.items())
    lines.append(f"  goal >= {SERVING_GOAL} of base at N={top} ({distinct.get(top, 0)} distinct/step): {goal}")
    figures = {f"N={n} {c}": ratio[(n, c)] for n in ns for c in configs if (n, c) in ratio}
    return lines, figures


def compression_section(doc: dict | None) -> tuple[list[str], dict]:
    if not doc or not doc.get("rows"):
        return ["compression: no results"], {}
    st = doc["settings"]
    lines = [f"compress() on {st['device']} (q/k/v of hidden {st['hidden']}, {st['layers']} layer(s), adapters r=16, "
             f"bank rank {st['rank']}, planted {st['groups']} groups):"]
    figures = {}
    scale = MISTRAL_LAYERS / st["layers"]
    for r in doc["rows"]:
        name = r["method"].replace("+clusters", f"+{st['clusters']} clusters")
        if "error" in r:
            lines.append(f"  n={r['n']:<5} {name:<20} {r['error']}")
            continue
        est = r["time_s"] * scale
        goal = ""
        if st["hidden"] == 4096 and r["n"] >= 1000 and r["method"] != "svd":
            goal = f"; goal < {COMPRESSION_GOAL_S:.0f} s: {'met' if est < COMPRESSION_GOAL_S else 'NOT met'}"
        lines.append(f"  n={r['n']:<5} {name:<20} {r['time_s']:8.2f} s  x{scale:g} layers est. {est:7.1f} s  "
                     f"saved {100 * r['params_saved']:5.1f}%  mean rel err {r['rel_error_mean']:.3g}  "
                     f"peak GPU {fmt(r.get('peak_gpu_mb'), '.0f')} MB{goal}")
        figures[f"n={r['n']} {name} s"] = r["time_s"]
        figures[f"n={r['n']} {name} s, {MISTRAL_LAYERS} layers est."] = est
    return lines, figures


def kernel_section(docs: dict[str, dict]) -> tuple[list[str], dict]:
    if not docs:
        return ["kernels: no results"], {}
    first = next(iter(docs.values()))
    s = first["settings"]
    copy = first.get("copy_gb_s")
    lines = [f"kernels, one layer call (T={s['tokens']}, {s['d_in']}->{s['d_out']}, r={s['rank']}, "
             f"{s['adapters']} adapters, {s['dtype']}, {first['device']}"
             + (f"; device copy {copy:.0f} GB/s" if copy else "") + "), ms:",
             f"  {'op':<12} {'base x@W.T':>10} {'matmul=FLOPs':>12} {'torch':>9} {'triton':>9} "
             f"{'matmul/triton':>13} {'triton GB/s':>11} {'TFLOP/s':>8}"]
    figures = {}
    for name, doc in docs.items():
        rows = {r["name"].split(" (")[0]: r for r in doc["rows"]}
        base, mm = rows.get("base x @ W.T"), rows.get("matmul of same FLOPs")
        torch_row, triton_row = rows.get("torch path"), rows.get("triton")
        eff = mm["ms"] / triton_row["ms"] if mm and triton_row else None
        lines.append(f"  {name:<12} {fmt(base and base['ms'], '.4f'):>10} {fmt(mm and mm['ms'], '.4f'):>12} "
                     f"{fmt(torch_row and torch_row['ms'], '.4f'):>9} {fmt(triton_row and triton_row['ms'], '.4f'):>9} "
                     f"{fmt(eff):>13} {fmt(triton_row and triton_row['gb_s'], '.1f'):>11} "
                     f"{fmt(triton_row and triton_row['tflop_s'], '.3f'):>8}")
        figures[f"{name} matmul/triton"] = eff
        figures[f"{name} triton/torch"] = (triton_row["ms"] / torch_row["ms"]) if triton_row and torch_row else None
    return lines, figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("work", type=Path)
    p.add_argument("--mode", default="cuda")
    p.add_argument("--seconds", type=int, default=None)
    a = p.parse_args()
    env = load_json(a.work / "env.json") or {"modules": {}}
    steps = read_steps(a.work)
    mods = env.get("modules", {})
    versions = ", ".join(f"{m} {v or 'MISSING'}" for m, v in mods.items())
    lines = [f"== kilolora GPU check ({a.mode}) on {env.get('gpu') or 'cpu'}: {fmt(a.seconds, 'd')} s in all ==",
             f"python {env.get('python', '?')}; {versions}",
             f"  {'step':<30} {'status':<8} {'time':>5}  result"]
    for st in steps:
        t = st.get("tests")
        result = (f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped"
                  if t else "")
        result = "; ".join(x for x in (result, st["note"]) if x)
        lines.append(f"  {st['step']} {st['name']:<28} {st['status']:<8} {st['seconds']:>4}s  {result}")
    serving, s_fig = serving_section(load_json(a.work / "serving.json"))
    compression, c_fig = compression_section(load_json(a.work / "compression.json"))
    kernel_docs = {name: d for name, f in (("bank K=1", "kernel_bank_K1.json"), ("bank K=8", "kernel_bank_K8.json"),
                                           ("dense", "kernel_dense.json"))
                   if (d := load_json(a.work / f)) is not None}
    kernels, k_fig = kernel_section(kernel_docs)
    lines += [""] + serving + [""] + compression + [""] + kernels
    text = "\n".join(lines) + "\n"
    print(text, end="")
    (a.work / "gpu_check_summary.txt").write_text(text)
    doc = {"mode": a.mode, "seconds": a.seconds, "env": env, "steps": steps,
           "figures": {"serving_ratio_to_base": s_fig, "compression": c_fig, "kernels": k_fig},
           "serving": load_json(a.work / "serving.json"), "compression": load_json(a.work / "compression.json"),
           "kernels": kernel_docs}
    (a.work / "gpu_check_summary.json").write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
