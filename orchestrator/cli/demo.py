"""`kilolora demo`: the main job (see `orchestrator.demo`)."""

from __future__ import annotations

import json as jsonlib
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

err_console = Console(stderr=True)


def demo(*, problems: int = 200, n: int = 8, seed: int = 0, strategies: str = "", world: str | None = None,
         url: str | None = None, json: bool = False, trace_out: str | None = None) -> None:
    """Run test-time strategies on held-out problems of the embedded world and compare them.

    Greedy decoding of the base model, majority vote and verifier-guided best-of-n over n
    samples, step checks with backtracking, step-level beam search, tool-augmented generation
    (the tool selector proposes calculator calls at step boundaries; the safe calculator's
    result is inserted; the base continues), and the full agent (tools + step checks with
    backtracking + the verifier). One engine serves the base and
    every skill adapter; activated skills read the base's KV cache and compute only their own
    tokens. Prints one table (accuracy, tokens computed, tokens reused from cache, wall time),
    what verification costs, and the trace of one solved problem with its adapter switches and
    tool calls. About a minute and a half on 2 CPU cores.

    Args:
      problems: held-out problems to run
      n: samples per problem for majority / best-of-n
      seed: seed of the problems' sampling
      strategies: comma-separated subset of greedy, majority, best_of_n, weighted, backtrack,
        beam, tools, agent (default: all)
      world: a world directory (default: the embedded one)
      url: run the graphs against this OpenAI-compatible server (`kilolora serve` on the same world,
        e.g. http://127.0.0.1:8000/v1) instead of in-process
      json: print the report as JSON on stdout (the table goes nowhere)
      trace_out: also write the example's trace (JSON) to this file
    """
    from skills.world import World

    from ..demo import DEFAULT, STRATEGIES, run_demo

    names = tuple(s.strip() for s in strategies.split(",") if s.strip()) or DEFAULT
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"--strategies: unknown {unknown}; choose from {', '.join(STRATEGIES)}")
    w = World.load(world)
    with err_console.status("starting") as status:
        report = run_demo(w, problems, n, seed, names, progress=lambda m: status.update(m), url=url)
    if trace_out and "example" in report:
        from pathlib import Path

        Path(trace_out).write_text(jsonlib.dumps(report["example"], indent=1))
    if json:
        print(jsonlib.dumps(report, indent=1))
        return
    _print(report, Console())


def _print(report: dict, console: Console) -> None:
    rows = report["strategies"]
    where = "in-process" if report["backend"] == "in-process" else f"over HTTP: {report['backend']}"
    t = Table(title=f"{report['problems']} held-out problems, n = {report['n']} (embedded world, {where})")
    for col, just in (("strategy", "left"), ("accuracy", "right"), ("vs greedy", "right"),
                      ("tokens computed", "right"), ("reused from cache", "right"), ("wall s", "right")):
        t.add_column(col, justify=just)
    for name, r in rows.items():
        vs = r.get("vs_greedy")
        t.add_row(name, f"{r['accuracy']:.3f}", "" if vs is None or name == "greedy" else f"{vs:+.3f}",
                  f"{r['tokens_computed']:,}", f"{r['tokens_reused']:,}", f"{r['wall_s']:.1f}")
    console.print(t)
    for name, r in rows.items():
        console.print(f"  [bold]{name}[/bold]: {escape(r['description'])}")
    bon = rows.get("best_of_n") or rows.get("majority")
    if bon and "pass_at_n" in bon:
        console.print(f"the samples' ceiling: pass@{report['n']} = {bon['pass_at_n']:.3f} (a right answer among the samples)")
    v = report.get("verification")
    if v:
        console.print(f"verification in best-of-{report['n']}: {v['calls']} verifier calls, each computing "
                      f"{v['prefilled_per_call']:.1f} tokens over {v['reused_per_call']:.0f} cached ones: "
                      f"{v['time_share']:.1%} of the sampling's engine time ({v['backend_ms'] / 1e3:.2f} s vs "
                      f"{v['generation_backend_ms'] / 1e3:.2f} s), {v['tokens_share']:.1%} of its computed tokens")
    ex = report.get("example")
    if ex:
        from ..trace import Trace

        console.print(f"\none solved problem, {ex['problem']} = {ex['answer']}, by {ex['graph']}:")
        console.print(f"  {escape(ex['text'])}")
        Trace(ex["graph"], ex["trace"]).render(console, title=f"trace ({ex['graph']})")
    if sys.stdout.isatty():
        console.print("[dim]--json for the full report; `kilolora demo --help` for the options[/dim]")
