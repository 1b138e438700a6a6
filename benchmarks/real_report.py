"""The report of `bench_real.py`: the table, the hardware-limit lines and the greedy match rates.

`results` maps (system, dtype, row label, batch) to a worker's record: `gen_tok_s` and `dec_tok_s`
(tokens/s of the whole call and of decode only; `dec_tok_s` None where noise made the decode time
<= 0), `tokens`, or `error`.
"""

from __future__ import annotations

import json
from pathlib import Path


def label(rec: dict) -> str:
    """A record's row in the table: kilolora's adapter rows name the path (dense or bank)."""
    path = rec.get("path")
    return rec["row"] if rec.get("system") != "kilolora" or path in (None, "base") else f"{rec['row']} · {path}"


def weight_count(model_dir: Path) -> int:
    """Parameters a decode step reads (every linear and the LM head; norms and one embedding row
    per token left out): also what it multiplies per token."""
    c = json.loads((model_dir / "config.json").read_text())
    h, heads = c["hidden_size"], c["num_attention_heads"]
    hd = c.get("head_dim") or h // heads
    kv = c.get("num_key_value_heads") or heads
    layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * c["intermediate_size"]
    return c["num_hidden_layers"] * layer + c["vocab_size"] * h


def limit_lines(hw: dict, params: int, dtypes, batches, results) -> list[str]:
    """Per dtype: the step time the measured bandwidth and GEMM rate allow at each batch, the
    tokens/s it implies, and the base rows' decode tokens/s as a share of it."""
    lines = []
    for dt in dtypes:
        size = 4 if dt == "float32" else 2
        bw, gemm = hw["bw_gbs"], hw["gemm_gflops"][dt]
        cells, over = [], False
        for b in batches:
            step = max(params * size / (bw * 1e9), 2 * params * b / (gemm * 1e9))  # seconds
            cell = f"batch {b}: {1000 * step:.3g} ms/step = {b / step:.0f} tok/s"
            for who, system in (("kilolora", "kilolora"), ("vLLM", "vllm")):
                got = results.get((system, dt, "base", b))
                if got and got.get("dec_tok_s"):
                    share = got["dec_tok_s"] * step / b
                    over |= share > 1
                    cell += f", {who} base decode {num(got['dec_tok_s'])} = {100 * share:.0f}%"
            cells.append(cell)
        lines.append(f"hardware limit ({dt}): read {bw:.1f} GB/s, GEMM {gemm:.0f} GFLOP/s (best of the probes at the "
                     f"start and the end), {params * size / 1e6:.3g} MB of weights, {params / 1e6:.3g} M params/token; "
                     + "; ".join(cells))
        if over:
            lines.append("  (over 100%: both probes ran in busier phases of the machine than that cell; "
                         "on a quiet machine the limit holds)")
    return lines


def match_lines(results: dict, dtypes, table_rows, batches) -> list[str]:
    """How often the comparators' greedy tokens equal kilolora's (dense or base rows only: the
    bank is a lossy compression of the adapters)."""
    lines = []
    for dt in dtypes:
        for sysname in ("vllm", "transformers"):
            same = total = agree = 0
            for row, path in table_rows:
                if path == "bank":
                    continue
                for b in batches:
                    k, o = results.get(("kilolora", dt, label({"row": row, "path": path, "system": "kilolora"}), b)), \
                        results.get((sysname, dt, row, b))
                    if not (k and o and "tokens" in k and "tokens" in o):
                        continue
                    for x, y in zip(k["tokens"], o["tokens"]):
                        total += 1
                        same += x == y
                        agree += next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), len(x)) / max(len(x), 1)
            if total:
                lines.append(f"greedy tokens vs kilolora ({dt}): {sysname} {same}/{total} sequences identical, "
                             f"{100 * agree / total:.0f}% of tokens before the first difference")
    return lines


def cell(rec: dict | None) -> str:
    if rec is None:
        return "—"
    if "error" in rec:
        return "n/a: " + rec["error"][:48]
    return f"{num(rec['gen_tok_s'])}/{num(rec['dec_tok_s'])}"


def num(x: float | None, f: str | None = None) -> str:
    """tokens/s to 3 digits (or as `f`); `?` for None, a decode time that noise made <= 0."""
    return "?" if x is None else format(x, f if f is not None else ".0f" if x >= 100 else ".3g")


def ratio(a: dict | None, b: dict | None) -> str:
    if not (a and b and "gen_tok_s" in a and "gen_tok_s" in b):
        return "—"
    dec = a["dec_tok_s"] / b["dec_tok_s"] if a["dec_tok_s"] and b["dec_tok_s"] else None
    return f"{a['gen_tok_s'] / b['gen_tok_s']:.2f}/{num(dec, '.2f')}"


def table(results: dict, dtypes, table_rows, batches, vs) -> list[str]:
    head = ["dtype", "row", "batch", "kilolora"] + [{"vllm": "vLLM", "transformers": "transformers"}[s] for s in vs] \
        + [f"kl/{'vLLM' if s == 'vllm' else 'tf'}" for s in vs]
    body = []
    for dt in dtypes:
        for row, path in table_rows:
            name = label({"row": row, "path": path, "system": "kilolora"})
            for b in batches:
                k = results.get(("kilolora", dt, name, b))
                others = [results.get((s, dt, row, b)) for s in vs]
                body.append([dt, name, str(b), cell(k)] + [cell(o) for o in others] + [ratio(k, o) for o in others])
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]

    def fmt(r):
        return " | ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths)))

    legend = "vLLM: `base` with LoRA off, the other rows with enable_lora (max_loras = the largest N); " \
        "transformers: the adapter rows through peft (adapter_names, `__base__` for LoRA-on base)" \
        if vs else "kilolora alone (--vs vllm --vs transformers adds the comparators)"
    return [fmt(head), "-+-".join("-" * w for w in widths)] + [fmt(r) for r in body] + [legend]
