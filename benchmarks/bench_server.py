"""The OpenAI-compatible server under N concurrent clients, beside the in-process engine on the same load.

N clients (threads, one `openai.OpenAI` client each) send chat requests to `kilolora serve` (the
embedded world) over HTTP; client i asks adapter i mod K of `base` and K-1 task adapters of the
bank, with prompts of its task (`shift: hello` for `shift-3`, an arithmetic problem for `base`),
temperature 0 and a fixed `max_tokens`, one request after another. Beside it, the in-process
`Engine` on the same load: the same prompt ids, adapters and sampling, each "client" submitting
its next request when its previous one finishes, driven by `open`/`submit`/`step` in one thread
(a long-lived thread of its own, as the server's engine loop is: on a busy 2-core VM, stepping
from the main thread was at times 5-10x slower, an artefact the server does not share).
Reported per side: requests/s, generated tokens/s, p50/p99 request latency, and server/in-process.

The server runs as a subprocess: its CPU time (uvicorn, JSON, pydantic, and its engine process) is
then measured apart from the clients', and the client threads do not share its GIL, as with real
clients. Both share the machine's cores, as clients on the same host do. The server runs as users
run it: its engine in a process of its own, with one torch thread fewer than torch's default, so
that the HTTP front end keeps a core (`kilolora serve --torch-threads`, printed below;
`--server-args=--engine-thread` runs the engine on a thread of the server's process instead),
while the in-process engine keeps torch's default (it has the cores to itself);
OMP_NUM_THREADS=1 runs both sides on one thread.
The in-process side gets the prompt ids ready-made; the server renders and tokenizes each chat.

Correctness first: an untimed warm-up run of each side per N must give the same texts (and token
counts) for every request; timed runs are checked again. The two sides alternate run by run, and
a table reports medians over `--repeats` runs (latency percentiles pool every timed request).

    python benchmarks/bench_server.py --quick                         # smoke: N = 1 4, 2 requests
    python benchmarks/bench_server.py                                 # N = 1 8 32, 8 requests each
    python benchmarks/bench_server.py --clients 64 --ignore-eos --max-tokens 64
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving import Engine, SamplingParams  # noqa: E402
from skills.tasks import Transform, make_problem  # noqa: E402
from skills.world import World  # noqa: E402


@dataclass
class Request:
    """One chat request of one client."""

    model: str
    """`base` or an adapter name (the API's `model` field)"""
    message: str
    ids: list[int]
    """the prompt as the server renders it (chat template, no special tokens added)"""


@dataclass
class Run:
    """One side's run of the whole load."""

    wall: float
    latencies: list[float]
    texts: list[list[str]]
    """texts[client][j]"""
    tokens: list[list[int]]
    """generated tokens of each request"""
    extra: dict = field(default_factory=dict)

    @property
    def n_requests(self) -> int:
        return len(self.latencies)

    @property
    def n_tokens(self) -> int:
        return sum(map(sum, self.tokens))


def make_load(world: World, tok, n_clients: int, per_client: int, n_adapters: int) -> list[list[Request]]:
    """Client i asks adapter i mod K (`base` and K-1 task adapters spread over the bank's tasks)."""
    tasks = [t for t in world.tasks if t["role"] == "task"]
    names = ["base"] + [tasks[j * len(tasks) // (n_adapters - 1)]["name"] for j in range(n_adapters - 1)]
    by_name = {t["name"]: Transform.parse(t["task"]) for t in tasks}
    load = []
    for i in range(n_clients):
        model = names[i % len(names)]
        reqs = []
        for j in range(per_client):
            rng = random.Random(f"{i}:{j}")
            if model == "base":
                msg = make_problem(rng).question
            else:
                msg = by_name[model].prompt(by_name[model].make_input(rng))
            text = tok.apply_chat_template([{"role": "user", "content": msg}], tokenize=False,
                                           add_generation_prompt=True)
            reqs.append(Request(model, msg, list(tok.encode(text, add_special_tokens=False))))
        load.append(reqs)
    return load


# --------------------------------------------------------------------------- the server side
class Server:
    """`kilolora serve --port <free>` as a subprocess, until `stop()`."""

    def __init__(self, engine_kw: dict, extra: list[str] = ()):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        exe = shutil.which("kilolora", path=str(Path(sys.executable).parent))
        cmd = [exe] if exe else [sys.executable, "-c", "from orchestrator.cli import main; main()"]
        cmd += ["serve", "--port", str(self.port), "--kv-cache-tokens", str(engine_kw["kv_cache_tokens"]),
                "--max-batch-tokens", str(engine_kw["max_batch_tokens"]), *extra]
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1])
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                self.log.seek(0)
                raise SystemExit(f"the server did not come up ({' '.join(cmd)}):\n{self.log.read().decode()[-3000:]}")
            time.sleep(0.2)

    def torch_threads(self) -> str:
        """The torch threads the server says it runs with (its startup line), or '?'."""
        self.log.seek(0)
        m = re.search(rb"the engine runs (.*) with (\d+) torch threads?", self.log.read())
        return f"{m.group(2).decode()}, its engine {m.group(1).decode()}" if m else "?"

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            lines = [line for line in r.read().decode().splitlines() if line and not line.startswith("#")]
            return {k: float(v) for k, v in (line.split() for line in lines)}

    def cpu_seconds(self) -> float | None:
        """user + system CPU of the server process and its children (the engine process), all their
        threads (Linux /proc; None elsewhere)."""
        total, todo = 0, [self.proc.pid]
        try:
            while todo:
                pid = todo.pop()
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
                todo += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            return None
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_server(server: Server, clients: list, load: list[list[Request]], a) -> Run:
    """Each client thread sends its requests one after another; all start together."""
    n = len(load)
    lat: list[list[float]] = [[] for _ in range(n)]
    texts: list[list[str]] = [[] for _ in range(n)]
    toks: list[list[int]] = [[] for _ in range(n)]
    errors: list[BaseException] = []
    start = threading.Barrier(n + 1)
    extra = {"ignore_eos": True} if a.ignore_eos else None

    def client(i: int) -> None:
        start.wait()
        try:
            for r in load[i]:
                t0 = time.perf_counter()
                out = clients[i].chat.completions.create(
                    model=r.model, messages=[{"role": "user", "content": r.message}], temperature=0,
                    max_tokens=a.max_tokens, extra_body=extra)
                lat[i].append(time.perf_counter() - t0)
                texts[i].append(out.choices[0].message.content or "")
                toks[i].append(out.usage.completion_tokens)
        except Exception as err:  # reported below with the client's index; the run is void
            errors.append(err)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    m0, s0, c0 = server.metrics(), server.cpu_seconds(), time.process_time()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    c1, s1, m1 = time.process_time(), server.cpu_seconds(), server.metrics()
    if errors:
        raise SystemExit(f"a client failed: {errors[0]!r}")
    extra_stats = {"steps": m1["kilolora_engine_steps"] - m0["kilolora_engine_steps"],
                   "step_s": m1["kilolora_engine_step_seconds"] - m0["kilolora_engine_step_seconds"],
                   "cpu": s1 - s0 if s0 is not None else float("nan"), "client_cpu": c1 - c0}
    return Run(wall, [x for xs in lat for x in xs], texts, toks, extra_stats)


# ----------------------------------------------------------------------- the in-process side
def run_engine(engine: Engine, load: list[list[Request]], params: SamplingParams) -> Run:
    """The same load on the engine, in the calling thread: a client's next request is submitted as soon
    as its previous one finishes (between two steps, as the server's engine loop does)."""
    n = len(load)
    lat: list[float] = []
    texts: list[list[str]] = [[] for _ in range(n)]
    toks: list[list[int]] = [[] for _ in range(n)]
    owner: dict[int, tuple[int, float]] = {}  # seq -> (client, submitted at)
    steps0, step_s, c0 = engine.steps, 0.0, time.process_time()

    def submit(i: int) -> None:
        r = load[i][len(texts[i])]
        seq = engine.open(r.ids, adapter=None if r.model == "base" else r.model)
        engine.submit(seq, params)
        owner[seq] = (i, time.perf_counter())

    t0 = time.perf_counter()
    for i in range(n):
        submit(i)
    while owner:
        ts = time.perf_counter()
        deltas = engine.step()
        step_s += time.perf_counter() - ts
        for d in deltas:
            if d.finished is None:
                continue
            i, t_sub = owner.pop(d.seq)
            lat.append(time.perf_counter() - t_sub)
            texts[i].append(d.finished.text or "")
            toks[i].append(len(d.finished.token_ids))
            engine.close(d.seq)
            if len(texts[i]) < len(load[i]):
                submit(i)
    wall = time.perf_counter() - t0
    extra = {"steps": engine.steps - steps0, "step_s": step_s, "cpu": time.process_time() - c0}
    return Run(wall, lat, texts, toks, extra)


def mismatches(load: list[list[Request]], srv: Run, eng: Run) -> list[str]:
    out = []
    for i, reqs in enumerate(load):
        for j, r in enumerate(reqs):
            if (srv.texts[i][j], srv.tokens[i][j]) != (eng.texts[i][j], eng.tokens[i][j]):
                out.append(f"client {i} request {j} ({r.model}, {r.message!r}): server {srv.texts[i][j]!r} "
                           f"({srv.tokens[i][j]} tokens) != in-process {eng.texts[i][j]!r} ({eng.tokens[i][j]} tokens)")
    return out


def pct(xs: list[float], q: float) -> float:
    """The q-quantile of xs (nearest rank, so p99 of a few hundred requests is a request's latency)."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", help="concurrent clients, one row each (default 1 8 32)")
    ap.add_argument("--requests", type=int, help="requests per client, one after another (default 8)")
    ap.add_argument("--max-tokens", type=int, help="max_tokens of every request (default 32)")
    ap.add_argument("--adapters", type=int, default=8, help="K: base and K-1 task adapters of the bank")
    ap.add_argument("--repeats", type=int, help="timed runs per side and N; the median is reported (default 3)")
    ap.add_argument("--ignore-eos", action="store_true", help="every request generates max_tokens tokens")
    ap.add_argument("--kv-cache-tokens", type=int, default=65536)
    ap.add_argument("--max-batch-tokens", type=int, default=2048)
    ap.add_argument("--server-args", default="", help="more `kilolora serve` flags, e.g. --server-args=--engine-thread")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: defaults become N = 1 4, 2 requests, max_tokens 8, 1 repeat")
    a = ap.parse_args()
    defaults = {"clients": ([1, 8, 32], [1, 4]), "requests": (8, 2), "max_tokens": (32, 8), "repeats": (3, 1)}
    for k, (full, quick) in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, quick if a.quick else full)
    if a.adapters < 2 or a.requests < 1 or a.repeats < 1 or min(a.clients) < 1:
        ap.error(f"need --adapters >= 2, --requests >= 1, --repeats >= 1 and every --clients >= 1; got "
                 f"{a.adapters}, {a.requests}, {a.repeats}, {a.clients}")

    import openai

    engine_kw = dict(kv_cache_tokens=a.kv_cache_tokens, max_batch_tokens=a.max_batch_tokens)
    world = World.load()
    engine = world.engine(**engine_kw)
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0, ignore_eos=a.ignore_eos)
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus, python "
          f"{platform.python_version()}, torch {torch.__version__} (threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), openai {openai.__version__}")
    loads = {n: make_load(world, engine.tokenizer, n, a.requests, a.adapters) for n in a.clients}
    models = sorted({r.model for load in loads.values() for c in load for r in c}, key=lambda m: (m != "base", m))
    c = engine.config
    print(f"model: embedded world ({world.path.name}), llama hidden {c.hidden_size}, {c.num_layers} layers, vocab "
          f"{c.vocab_size}, {len(engine.adapters)} adapters resident; chat requests, temperature 0, max_tokens "
          f"{a.max_tokens}{' (ignore_eos)' if a.ignore_eos else ''}, {a.requests} per client; adapters: "
          f"{', '.join(models)}; kv cache {a.kv_cache_tokens}, max batch tokens {a.max_batch_tokens}; "
          f"median of {a.repeats}")
    print("server: `kilolora serve` subprocess on 127.0.0.1 (same environment; its CPU counted apart); clients: "
          "one thread and one openai.OpenAI each, in this process", flush=True)

    server = Server(engine_kw, a.server_args.split())
    print(f"server: torch threads {server.torch_threads()} (in-process: {torch.get_num_threads()})", flush=True)
    stepper = ThreadPoolExecutor(1, thread_name_prefix="in-process-engine")
    rows = []
    try:
        for n in a.clients:
            load = loads[n]
            clients = [openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
                       for _ in range(n)]
            srv = run_server(server, clients, load, a)  # warm-up
            eng = stepper.submit(run_engine, engine, load, params).result()
            bad = mismatches(load, srv, eng)
            if bad:
                raise SystemExit(f"correctness check failed: {len(bad)} of {srv.n_requests} requests differ, e.g.\n  "
                                 + "\n  ".join(bad[:5]))
            print(f"correctness: N={n}: the server's texts == the in-process engine's for all {srv.n_requests} "
                  f"requests ({srv.n_tokens} tokens, {len({r.model for reqs in load for r in reqs})} models, "
                  f"{len({t for ts in eng.texts for t in ts})} distinct texts)", flush=True)
            runs: dict[str, list[Run]] = {"server": [], "in-process": []}
            for rep in range(a.repeats):
                order = ("server", "in-process") if rep % 2 == 0 else ("in-process", "server")
                for side in order:
                    run = run_server(server, clients, load, a) if side == "server" else \
                        stepper.submit(run_engine, engine, load, params).result()
                    runs[side].append(run)
                bad += mismatches(load, runs["server"][-1], runs["in-process"][-1])
            for cl in clients:
                cl.close()
            rows.append(summarize(n, runs, len(bad)))
            print_rows(rows[-1:], header=True)
    finally:
        server.stop()
        stepper.shutdown()

    print(f"\n== {a.requests} chat requests per client, max_tokens {a.max_tokens}; ratio = server / in-process "
          f"(req/s); median of {a.repeats} runs, latency percentiles over all timed requests ==")
    print_rows(rows, header=True)
    print("\n== where the time goes (medians per run): engine steps, ms inside each step(), CPU seconds per wall "
          "second of the serving process (server: uvicorn and its engine process), the client "
          "threads' CPU seconds, and the server's extra latency per request ==")
    print(f"{'N':>4} {'steps srv/in':>12} {'ms/step srv':>11} {'ms/step in':>10} {'CPU/wall srv':>12} "
          f"{'CPU/wall in':>11} {'client CPU s':>12} {'+ms/request':>11}")
    for r in rows:
        s, e = r["server"], r["in-process"]
        print(f"{r['n']:>4} {s['steps']:>6.0f}/{e['steps']:<5.0f} {1000 * s['step_s'] / s['steps']:>11.2f} "
              f"{1000 * e['step_s'] / e['steps']:>10.2f} {s['cpu'] / s['wall']:>12.2f} {e['cpu'] / e['wall']:>11.2f} "
              f"{s['client_cpu']:>12.2f} {1000 * (s['mean_lat'] - e['mean_lat']):>11.1f}")


def summarize(n: int, runs: dict[str, list[Run]], n_bad: int) -> dict:
    row = {"n": n, "mismatches": n_bad}
    for side, rs in runs.items():
        lat = [x for r in rs for x in r.latencies]
        row[side] = {"requests": rs[0].n_requests, "tokens": rs[0].n_tokens,
                     "req_s": statistics.median(r.n_requests / r.wall for r in rs),
                     "tok_s": statistics.median(r.n_tokens / r.wall for r in rs),
                     "p50": pct(lat, 0.50), "p99": pct(lat, 0.99), "mean_lat": statistics.fmean(lat),
                     "wall": statistics.median(r.wall for r in rs),
                     **{k: statistics.median(r.extra[k] for r in rs) for k in rs[0].extra}}
    row["ratio"] = row["server"]["req_s"] / row["in-process"]["req_s"]
    return row


def print_rows(rows: list[dict], header: bool = False) -> None:
    if header:
        print(f"{'N':>4} {'side':<11} {'requests':>8} {'tokens':>6} {'req/s':>7} {'tok/s':>7} {'p50 ms':>7} "
              f"{'p99 ms':>7} {'ratio':>6}")
    for r in rows:
        for side in ("server", "in-process"):
            s = r[side]
            ratio = f"{r['ratio']:>6.2f}" if side == "server" else f"{1:>6.2f}"
            print(f"{r['n']:>4} {side:<11} {s['requests']:>8} {s['tokens']:>6} {s['req_s']:>7.1f} {s['tok_s']:>7.0f} "
                  f"{1000 * s['p50']:>7.1f} {1000 * s['p99']:>7.1f} {ratio}", flush=True)
        if r["mismatches"]:
            print(f"     !! {r['mismatches']} timed requests gave different texts on the two sides (batch-order "
                  f"float noise at temperature 0?)", flush=True)


if __name__ == "__main__":
    main()
