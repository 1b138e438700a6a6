"""The per-system processes of `bench_real.py`: kilolora, transformers (+ peft) and the hardware probe.

Each runs alone in its own process (`python benchmarks/real_workers.py SYSTEM SPEC.json`), with
`spec["threads"]` torch threads, so no two systems share a process or its thread pools. It prints
`@@result {json}` per (row, batch) as it completes, `@@error {json}` for a row that failed (the
others go on), `@@check {json}` in check mode, `@@hardware {json}` for the probe. The spec is
`bench_real.py`'s (model, dtype, prompts, batches, max_tokens, repeats, rows, lora_dirs, bank_dir).

Timing is the same for every system (see `bench_real.py`): greedy, EOS ignored, `max_tokens` new
tokens per sequence; `gen_s` is the whole call (prefill + decode); the decode-only time is, for
kilolora, the steps after the first (which prefills every prompt and samples its first token) and,
for transformers, `gen_s` minus a 1-token generate of the same batch (None where noise makes that difference <= 0).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def emit(kind: str, obj: dict) -> None:
    print(f"@@{kind} {json.dumps(obj)}", flush=True)


def each_row(spec: dict, system: str, run_one, rows=None) -> None:
    """run_one(row, batch) -> (gen_s, dec_s, tokens), repeated after a warm-up; one line per cell."""
    T = spec["max_tokens"]
    for row in rows if rows is not None else spec["rows"]:
        for b in spec["batches"]:
            try:
                run_one(row, b, warm=True)
                runs = [run_one(row, b) for _ in range(spec["repeats"])]
                g, d = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
                emit("result", {"system": system, "path": row.get("path"), "row": row["row"], "batch": b,
                                "gen_s": [r[0] for r in runs], "dec_s": [r[1] for r in runs],
                                "gen_tok_s": b * T / g, "dec_tok_s": b * (T - 1) / d if d > 0 else None,
                                "tokens": runs[-1][2]})
            except Exception as e:  # a failing row (out of memory, a refused adapter) must not lose the rest
                traceback.print_exc()
                emit("error", {"system": system, "path": row.get("path"), "row": row["row"], "batch": b,
                               "error": f"{type(e).__name__}: {e}"[:200]})


# ------------------------------------------------------------------ kilolora
def clear_prefix_cache(engine) -> None:
    """Forget every cached block, so each timed run computes its prompts (vLLM runs with prefix
    caching off): between runs no sequence is open, so every cached block is free."""
    bm = engine.blocks
    assert bm.num_used == 0, "clear_prefix_cache with open sequences"
    for b in list(bm._free_cached):
        bm.key_of[b] = None
        bm._free_plain.append(b)
    bm._free_cached.clear()
    bm.by_key.clear()


def kilolora_run(engine, prompts, adapters, T: int):
    """(whole-call seconds, decode seconds, tokens): open + submit + step until done."""
    from serving import SamplingParams

    clear_prefix_cache(engine)
    t0 = time.perf_counter()
    seqs = [engine.open(p, adapter=a) for p, a in zip(prompts, adapters)]
    for s in seqs:
        engine.submit(s, SamplingParams(max_tokens=T, temperature=0, ignore_eos=True))
    steps0 = engine.steps
    engine.step()  # every prompt fits max_batch_tokens: this prefills them all and samples token 1
    t1 = time.perf_counter()
    while engine.has_work():
        engine.step()
    t2 = time.perf_counter()
    out = engine.wait(seqs)
    for s in seqs:
        engine.close(s)
    if T > 1 and engine.steps - steps0 != T:
        raise RuntimeError(f"{engine.steps - steps0} steps for {T} tokens: the prefill was split "
                           "(raise max_batch_tokens), so the decode time would include prefill")
    return t2 - t0, t2 - t1, [c.token_ids for c in out]


def kilolora_engine(spec: dict, path: str, dtype: torch.dtype):
    from serving import Engine

    biggest = max(spec["batches"])
    longest = max(len(p) for p in spec["prompts"])
    prompt_tokens = sum(len(p) for p in spec["prompts"][:biggest])
    engine = Engine.from_pretrained(spec["model"], dtype=dtype, max_batch_tokens=prompt_tokens + biggest,
                                    kv_cache_tokens=biggest * (longest + spec["max_tokens"] + 32))
    if path == "dense":
        for i, d in enumerate(spec["lora_dirs"]):
            engine.load_adapter(f"a{i}", d)
        return engine, [f"a{i}" for i in range(len(spec["lora_dirs"]))]
    if path == "bank":
        from compression import Bank

        if spec.get("random_bank"):  # bench_real --bank random: factors of the shapes, not the adapters
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from bench_serving import random_bank

            bank = random_bank(engine, len(spec["lora_dirs"]), 1, spec["rank"], seed=0)
        else:
            bank = Bank.load(spec["bank_dir"])
        engine.load_bank(bank)
        return engine, bank.names  # entry i is adapter i (the directories sort in index order)
    return engine, []


def kilolora(spec: dict) -> None:
    dtype = getattr(torch, spec["dtype"])
    T = spec["max_tokens"]
    if spec.get("check"):
        return kilolora_check(spec)
    for path in dict.fromkeys(r["path"] for r in spec["rows"]):  # one engine at a time, in row order
        try:
            engine, names = kilolora_engine(spec, path, dtype)
        except Exception as e:
            traceback.print_exc()
            for row in [r for r in spec["rows"] if r["path"] == path]:
                for b in spec["batches"]:
                    emit("error", {"system": "kilolora", "path": path, "row": row["row"], "batch": b,
                                   "error": f"{type(e).__name__}: {e}"[:200]})
            continue

        def run_one(row, b, warm=False, engine=engine, names=names):
            n = row["n"]
            adapters = [names[i % n] for i in range(b)] if n else [None] * b
            return kilolora_run(engine, spec["prompts"][:b], adapters, 4 if warm else T)

        each_row(spec, "kilolora", run_one, [r for r in spec["rows"] if r["path"] == path])
        del engine


def kilolora_check(spec: dict) -> None:
    """float32 greedy tokens: the base on prompts 0 and 1 alone, adapter i (dense) on prompt i, and
    bank entry 0 against its own dense export (B' = U Σ, A' = Vᵀ) on prompt 0."""
    from compression import LoraAdapter
    from serving import SamplingParams

    T, prompts = spec["max_tokens"], spec["prompts"][:2]
    p = SamplingParams(max_tokens=T, temperature=0, ignore_eos=True)
    engine, names = kilolora_engine(dict(spec, batches=[2]), "dense", torch.float32)
    base = [engine.generate([q], params=p)[0].token_ids for q in prompts]
    adapted = [engine.generate([q], adapter=names[i % len(names)], params=p)[0].token_ids
               for i, q in enumerate(prompts) if names]
    out = {"base": base, "adapter": adapted}
    del engine
    if spec.get("bank_dir") or spec.get("random_bank"):
        engine, names = kilolora_engine(dict(spec, batches=[2]), "bank", torch.float32)
        bank = engine.registry.bank
        A, B = bank.factors(names[0])
        engine.add_adapter("export", LoraAdapter("export", {"r": bank.rank}, A, B))
        out["bank"] = engine.generate([prompts[0]], adapter=names[0], params=p)[0].token_ids
        out["bank_export"] = engine.generate([prompts[0]], adapter="export", params=p)[0].token_ids
    emit("check", out)


# ------------------------------------------------------------------ transformers (+ peft)
def hf_generate(model, prompts, T: int, pad: int, adapter_names=None):
    """(seconds, tokens) of a left-padded greedy batch; EOS neither stops nor is masked (as ignore_eos)."""
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompts])  # (B, L)
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    # EOS neither stops nor is masked: eos_token_id=None as an argument (a GenerationConfig's None
    # falls back to the model's EOS), and no min_new_tokens (it masks the EOS logit, where vLLM and
    # kilolora with ignore_eos sample it and go on)
    kw = dict(max_new_tokens=T, do_sample=False, eos_token_id=None, pad_token_id=pad, temperature=None, top_p=None,
              top_k=None)
    if adapter_names is not None:
        kw["adapter_names"] = adapter_names
    with torch.no_grad():
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        dt = time.perf_counter() - t
    return dt, out[:, L:].tolist()


def transformers(spec: dict) -> None:
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if spec.get("check") else getattr(torch, spec["dtype"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    T = spec["max_tokens"]
    if spec.get("check"):
        return transformers_check(spec, model, pad)

    def run_one(row, b, warm=False, names=None):
        prompts = spec["prompts"][:b]
        n = row["n"]
        an = None if names is None else [names[i % n] for i in range(b)] if n else ["__base__"] * b
        if warm:
            hf_generate(model_, prompts, 2, pad, an)
            return None
        one, _ = hf_generate(model_, prompts, 1, pad, an)
        gen, tokens = hf_generate(model_, prompts, T, pad, an)
        return gen, gen - one, tokens

    model_ = model
    each_row(spec, "transformers", run_one, [r for r in spec["rows"] if r["path"] == "base"])
    lora_rows = [r for r in spec["rows"] if r["path"] != "base"]
    fits = [r for r in lora_rows if r["n"] <= spec["tf_max_adapters"]]
    for r in lora_rows:
        if r not in fits:
            for b in spec["batches"]:
                emit("error", {"system": "transformers", "path": r["path"], "row": r["row"], "batch": b,
                               "error": f"skipped: peft with {r['n']} adapters in one batch takes minutes a run "
                                        f"(--tf-max-adapters {spec['tf_max_adapters']})"})
    if fits:
        n = max(max(r["n"] for r in fits), 1)
        model_ = peft_model(model, spec["lora_dirs"][:n])
        each_row(spec, "transformers", lambda row, b, warm=False: run_one(row, b, warm, [f"a{i}" for i in range(n)]),
                 fits)


def peft_model(model, dirs):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name="a0")
        for i, d in enumerate(dirs[1:], 1):
            m.load_adapter(str(d), adapter_name=f"a{i}")
    return m.eval()


def transformers_check(spec: dict, model, pad: int) -> None:
    T, prompts = spec["max_tokens"], spec["prompts"][:2]
    base = [hf_generate(model, [q], T, pad)[1][0] for q in prompts]
    dirs = spec["lora_dirs"][:2]
    adapted = []
    if dirs:
        m = peft_model(model, dirs)
        adapted = [hf_generate(m, [q], T, pad, [f"a{i % len(dirs)}"])[1][0] for i, q in enumerate(prompts)]
    emit("check", {"base": base, "adapter": adapted})


# ------------------------------------------------------------------ hardware
def hardware(spec: dict) -> None:
    """Best of several: read bandwidth (sum of a 512 MiB float32 tensor, far beyond the caches) and
    GEMM rate (2048³) per dtype, the faster of torch's matmul and oneDNN's GEMM on a pre-packed
    weight (the one kilolora's packed path and vLLM's CPU backend call: 2.3x MKL's float32 on AMD)."""
    out = {"bw_gbs": _read_bandwidth(), "gemm_gflops": {}}
    n = 2048
    mkldnn = torch.ops.mkldnn
    for name in spec["dtypes"]:
        a = torch.randn(n, n).to(getattr(torch, name))
        b = torch.randn(n, n).to(getattr(torch, name))
        gemms = [lambda: a @ b]
        if torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_linear_pointwise"):
            packed = mkldnn._reorder_linear_weight(b.T.contiguous(), batch_size=n)
            gemms.append(lambda: mkldnn._linear_pointwise(a, packed, None, "none", [], ""))
        best = float("inf")
        for gemm in gemms:
            gemm()
            best = min(best, *(_timed(gemm) for _ in range(3)))
        out["gemm_gflops"][name] = 2 * n**3 / best / 1e9
    emit("hardware", out)


def _read_bandwidth() -> float:
    x = torch.ones(128 * 2**20)  # 512 MiB
    x.sum()
    t = min(_timed(lambda: x.sum()) for _ in range(5))
    return x.numel() * x.element_size() / t / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


SYSTEMS = {"kilolora": kilolora, "transformers": transformers, "hardware": hardware}

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in SYSTEMS:
        raise SystemExit(f"usage: real_workers.py {{{','.join(SYSTEMS)}}} SPEC.json")
    spec = json.loads(Path(sys.argv[2]).read_text())
    torch.set_num_threads(spec["threads"])
    SYSTEMS[sys.argv[1]](spec)
