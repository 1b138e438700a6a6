"""Benchmark `compression.compress` on planted LoRA collections at Mistral-7B attention shapes.

Measures, per collection size n and method (per-adapter svd, jd-full, jd-diag, jd-full with K
clusters, jd-full weighted by 1/‖ΔW_i‖²): parameters before / after, reconstruction error
(relative Frobenius, per adapter), the iterations the fits took to converge (max and mean over
targets and clusters, and the share that met the tolerance), wall time of the compress call, and
peak memory. Every (n, method) runs in a fresh subprocess that generates its own data from the
seed, so its peak RSS (`ru_maxrss`, which includes the generated input and the imports) belongs
to that one configuration; the JSON also has the RSS just before compress. The svd baseline is
the comparator: "time vs svd" is time / svd time and "saved vs svd" is 1 − params after / svd
params after, both at the same n.

Adapters are r=16 LoRAs on q (4096→4096), k and v (4096→1024) of every layer, built in memory
with `compression.synthetic.planted_factors`: `--groups` groups, each with its own shared bases
of rank `--shared-rank`, plus noise. `--norm-spread S` scales adapter i's ΔW by S^u_i with u_i
uniform in [0, 1], where the relative weighting matters (the default 1 keeps the planted norms).
Method follows Brüel-Gabrielsson et al., "Compress then Serve" (ICML 2025).

    python benchmarks/bench_compression.py --hidden 512 --n 10 50    # quick, under a minute
    python benchmarks/bench_compression.py                           # hidden 4096, n = 10 100
    python benchmarks/bench_compression.py --n 10 100 500 1000 --repeats 1 --json bench.json  # full run

Times are the median of `--repeats` compress calls after a warm-up; on a small shared VM single
calls occasionally run many times slower, so keep repeats > 1 where the budget allows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from compression import Collection, CompressConfig, LoraAdapter, compress
from compression.synthetic import PlantedSpec, planted_factors

MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj"}
METHODS = ("svd", "jd-full", "jd-diag", "jd-full+clusters", "jd-full+relative")
ADAPTER_RANK = 16


def make_collection(n, hidden, layers, modules, shared_rank, groups, noise, seed, norm_spread=1.0) -> Collection:
    """A planted collection of n rank-16 adapters, in memory (no disk); ΔW_i scaled by norm_spread^u_i."""
    shapes = {"q": (hidden, hidden), "k": (hidden, hidden // 4), "v": (hidden, hidden // 4)}  # (in, out)
    spec = PlantedSpec(
        n=n,
        modules=tuple((MODULES[m], *shapes[m]) for m in modules),
        layers=layers,
        r=ADAPTER_RANK,
        shared_rank=shared_rank,
        groups=groups,
        noise=noise,
        seed=seed,
    )
    As, Bs, _ = planted_factors(spec)  # per adapter: target -> (r, d_in), target -> (d_out, r)
    if norm_spread != 1.0:
        u = torch.rand(n, generator=torch.Generator().manual_seed(seed + 1))
        Bs = [{t: b * norm_spread ** float(u[i]) for t, b in Bs[i].items()} for i in range(n)]
    config = {
        "r": ADAPTER_RANK,
        "lora_alpha": ADAPTER_RANK,  # scaling 1: the planted factors are already the effective ones
        "target_modules": [MODULES[m] for m in modules],
        "base_model_name_or_path": "mistral-7b-planted",
    }
    return Collection([LoraAdapter(f"adapter_{i:04d}", dict(config), As[i], Bs[i]) for i in range(n)])


def make_config(method: str, rank: int, clusters: int, iters: int | None, tol: float, device: str, seed: int) -> CompressConfig:
    common = dict(rank=rank, iters=iters, tol=tol, device=device, seed=seed)
    if method == "jd-full+clusters":
        return CompressConfig(method="jd-full", clusters=clusters, **common)
    if method == "jd-full+relative":
        return CompressConfig(method="jd-full", clusters=1, weighting="relative", **common)
    return CompressConfig(method=method, clusters=1, **common)


def check_correctness(device: str) -> None:
    """Zero noise, one group: JD-Full at rank = shared rank and svd at full rank must be exact."""
    coll = make_collection(8, 64, 2, ("q", "k", "v"), shared_rank=8, groups=1, noise=0.0, seed=123)
    for method, rank in (("jd-full", 8), ("svd", ADAPTER_RANK)):
        stats = compress(coll, make_config(method, rank, 1, None, 1e-4, device, 0)).stats()
        if not stats["rel_error_mean"] < 1e-4:
            sys.exit(
                f"correctness check failed: {method} at rank {rank} on a noiseless planted collection "
                f"has mean relative error {stats['rel_error_mean']:.3g} (expected < 1e-4); not benchmarking"
            )
    print("correctness check passed: jd-full recovers a noiseless planted collection; svd at full rank is exact")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_mb() -> float | None:
    """Current resident set size (Linux /proc), to separate the data from the compress peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


def worker(job: dict) -> dict:
    """Runs in a fresh process: generate the collection, time compress, report stats and peaks."""
    coll = make_collection(
        job["n"], job["hidden"], job["layers"], job["modules"], job["shared_rank"], job["groups"], job["noise"], job["seed"],
        job["norm_spread"],
    )
    input_bytes = sum(t.numel() * t.element_size() for a in coll.adapters for d in (a.lora_A, a.lora_B) for t in d.values())
    cfg = make_config(job["method"], job["rank"], job["clusters"], job["iters"], job["tol"], job["device"], job["seed"])
    # Warm-up on a few of the same adapters: the first LAPACK call at a new size can take a second
    # (kernels paged in on first use), which is not the method's cost.
    few = Collection(coll.adapters[: min(job["n"], max(2 * cfg.clusters, 8))])
    compress(few, make_config(job["method"], job["rank"], cfg.clusters, 2, job["tol"], job["device"], job["seed"]))
    rss_before = _rss_mb()
    if job["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = [], []
    for _ in range(job["repeats"]):
        _sync(job["device"])
        t0, c0 = time.perf_counter(), time.process_time()
        bank = compress(coll, cfg)
        _sync(job["device"])
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)  # wall ≫ cpu / threads means the process was descheduled
    stats = bank.stats()
    return {
        "n": job["n"],
        "method": job["method"],
        **{k: stats[k] for k in ("params_before", "params_after", "params_saved", "rel_error_mean", "rel_error_max")},
        "clusters": stats["clusters"],
        "cluster_sizes": stats["cluster_sizes"],
        **{k: stats[k] for k in ("fit_iterations_max", "fit_iterations_mean", "fit_converged")},
        "clustering_rounds": len(bank.history.get("clustering", [])),
        "time_s": statistics.median(times),
        "times_s": times,
        "cpu_times_s": cpu_times,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # ru_maxrss is KB on Linux
        "rss_before_compress_mb": rss_before,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if job["device"].startswith("cuda") else None,
        "input_mb": input_bytes / 2**20,
    }


def run_job(job: dict) -> dict:
    """Run one configuration in a fresh interpreter; a crash (e.g. out of memory) becomes a row."""
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"[n={job['n']} {job['method']}] failed with exit code {proc.returncode}:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return {"n": job["n"], "method": job["method"], "error": f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def add_ratios(rows: list[dict]) -> None:
    svd = {r["n"]: r for r in rows if r["method"] == "svd" and "error" not in r}
    for r in rows:
        base = svd.get(r["n"])
        if base is None or "error" in r:
            continue
        r["time_vs_svd"] = r["time_s"] / base["time_s"] if base["time_s"] > 0 else None
        r["saved_vs_svd"] = 1 - r["params_after"] / base["params_after"]


def print_table(rows: list[dict], device: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="compress() on planted Mistral-7B q/k/v collections")
    cols = ["n", "method", "params before", "params after", "saved %", "mean rel err", "max rel err", "iters max / mean",
            "converged %", "time (s)", "time vs svd", "saved vs svd %", "peak RSS (MB)", "input MB"] + (
        ["peak GPU (MB)"] if device != "cpu" else [])
    for c in cols:
        table.add_column(c, justify="left" if c == "method" else "right")
    for r in rows:
        if "error" in r:
            table.add_row(str(r["n"]), r["method"], f"[red]{r['error']}[/red]", *[""] * (len(cols) - 3))
            continue
        opt = lambda v, fmt, scale=1: "-" if v is None else format(scale * v, fmt)  # noqa: E731
        cells = [
            str(r["n"]), r["method"], f"{r['params_before'] / 1e6:.2f}M", f"{r['params_after'] / 1e6:.2f}M",
            f"{100 * r['params_saved']:.1f}", f"{r['rel_error_mean']:.2e}", f"{r['rel_error_max']:.2e}",
            "-" if r.get("fit_iterations_max") is None else f"{r['fit_iterations_max']} / {r['fit_iterations_mean']:.1f}",
            opt(r.get("fit_converged"), ".0f", 100), f"{r['time_s']:.3f}", opt(r.get("time_vs_svd"), ".2f"), opt(r.get("saved_vs_svd"), ".1f", 100),
            f"{r['peak_rss_mb']:.0f}", f"{r['input_mb']:.0f}",
        ] + ([opt(r["peak_gpu_mb"], ".0f")] if device != "cpu" else [])
        table.add_row(*cells)
    # Piped output would otherwise be cut to 80 columns.
    (Console() if sys.stdout.isatty() else Console(width=200)).print(table)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--n", type=int, nargs="+", default=[10, 100], help="collection sizes (default: 10 100)")
    p.add_argument("--layers", type=int, default=1, help="layers, each with the chosen q/k/v targets (default: 1)")
    p.add_argument("--modules", nargs="+", choices=list(MODULES), default=list(MODULES), help="targets per layer")
    p.add_argument("--hidden", type=int, default=4096, help="q is hidden→hidden, k and v hidden→hidden/4 (default: 4096)")
    p.add_argument("--rank", type=int, default=16, help="rank of the bank's bases (default: 16)")
    p.add_argument("--clusters", type=int, default=4, help="K for jd-full+clusters (default: 4)")
    p.add_argument("--iters", type=int, default=None,
                   help="maximum alternating iterations per fit (default: compress's, 100 for jd-full, 500 for jd-diag)")
    p.add_argument("--tol", type=float, default=1e-4, help="convergence tolerance of the fits, relative (default: 1e-4)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--groups", type=int, default=4, help="planted groups, each with its own bases (default: 4)")
    p.add_argument("--shared-rank", type=int, default=16, help="rank of each group's planted bases (default: 16)")
    p.add_argument("--noise", type=float, default=0.05, help="planted noise ε (default: 0.05)")
    p.add_argument("--norm-spread", type=float, default=1.0,
                   help="scale adapter i by SPREAD^u_i, u_i uniform in [0, 1] (default: 1, planted norms)")
    p.add_argument("--repeats", type=int, default=3, help="compress calls per configuration; the median is shown (default: 3)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    sys.stdout.reconfigure(line_buffering=True)  # keep the header and the progress lines on stderr in order
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.hidden % 4 != 0 or args.hidden < 4:
        p.error(f"--hidden must be a positive multiple of 4 (k/v out = hidden/4); got {args.hidden}")
    smallest = args.hidden if args.modules == ["q"] else args.hidden // 4
    if not 1 <= args.rank <= smallest:
        p.error(f"--rank must be between 1 and the smallest target dimension ({smallest}); got {args.rank}")
    if min(args.n) < 1 or min(args.repeats, args.layers, args.groups, args.shared_rank) < 1:
        p.error("--n, --repeats, --layers, --groups and --shared-rank must be >= 1; "
                f"got n={args.n}, repeats={args.repeats}, layers={args.layers}, groups={args.groups}, "
                f"shared_rank={args.shared_rank}")

    if not (args.norm_spread > 0 and args.tol >= 0 and (args.iters is None or args.iters >= 0)):
        p.error(f"--norm-spread must be > 0, --tol and --iters >= 0; got norm_spread={args.norm_spread}, "
                f"tol={args.tol}, iters={args.iters}")

    gpu = f" ({torch.cuda.get_device_name(args.device)})" if args.device.startswith("cuda") and torch.cuda.is_available() else ""
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": args.device + gpu}
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}{gpu}")
    print(f"settings: hidden={args.hidden} layers={args.layers} modules={','.join(args.modules)} adapter r={ADAPTER_RANK} "
          f"groups={args.groups} shared_rank={args.shared_rank} noise={args.noise} norm_spread={args.norm_spread} | "
          f"bank rank={args.rank} clusters={args.clusters} iters={'default' if args.iters is None else args.iters} "
          f"tol={args.tol} repeats={args.repeats} seed={args.seed}")
    check_correctness(args.device)

    rows = []
    base = {k: getattr(args, k) for k in ("hidden", "layers", "modules", "rank", "clusters", "iters", "tol", "groups",
                                          "shared_rank", "noise", "norm_spread", "repeats", "device", "seed")}
    for n in args.n:
        for method in args.methods:
            if method == "jd-full+clusters" and args.clusters > n:
                print(f"[n={n}] skipping jd-full+clusters: {args.clusters} clusters > {n} adapters", file=sys.stderr)
                continue
            t0 = time.perf_counter()
            rows.append(run_job({**base, "n": n, "method": method}))
            print(f"[n={n} {method}] done in {time.perf_counter() - t0:.1f}s (subprocess, incl. data generation)", file=sys.stderr)
    add_ratios(rows)
    print_table(rows, args.device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "settings": base, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
