"""`kilolora demo`: the main job (see `orchestrator.demo`)."""

from __future__ import annotations

import json as jsonlib
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

err_console = Console(stderr=True)


def demo(*, problems: int = 200, n: int = 8, seed: int = 0, strategies: str = "", world: str | None = None,
         url: str | None = None, json: bool = False, trace_out: str | None = None, no_bank: bool = False) -> None:
    """Run test-time strategies on held-out problems of the embedded world, then the task bank at work.

    Greedy decoding of the base model, majority vote and verifier-guided best-of-n over n
    samples, step checks with backtracking, step-level beam search, tool-augmented generation
    (the tool selector proposes calculator calls at step boundaries; the safe calculator's
    result is inserted; the base continues), and the full agent (tools + step checks with
    backtracking + the verifier). One engine serves the base and
    every skill adapter; activated skills read the base's KV cache and compute only their own
    tokens. Prints one table (accuracy, tokens computed, tokens reused from cache, wall time),
    what verification costs, and the trace of one solved problem with its adapter switches and
    tool calls.

    Then the bank: one user per bank entry (about a thousand in a full world), each on its own
    adapter, all submitted together to the one engine: task adapters transform a held-out input
    (greedy), per-task verifiers judge a held-out answer. A second table gives their accuracy
    served from the bank, from the uncompressed adapters (measured when the world has them,
    else the figure recorded at build, labelled so) and from the base alone; then the decode
    throughput of that load on the bank against the base (the same prompts and tokens, best of
    3, alternating; in-process only), and best-of-4 samples of each verified task's adapter
    picked by its own verifier from the bank, against greedy, with the verifier's cost in
    tokens computed over tokens reused from the KV cache. About two and a half minutes on 2
    CPU cores in all (the bank part: about a minute for a thousand entries); --no-bank skips it.

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
      no_bank: skip the bank part (its users, throughput and per-task verifiers)
    """
    from skills.world import World

    from ..demo import DEFAULT, STRATEGIES, run_demo

    names = tuple(s.strip() for s in strategies.split(",") if s.strip()) or DEFAULT
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"--strategies: unknown {unknown}; choose from {', '.join(STRATEGIES)}")
    w = World.load(world)
    with err_console.status("starting") as status:
        report = run_demo(w, problems, n, seed, names, progress=lambda m: status.update(m), url=url,
                          bank=not no_bank)
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
    if report.get("bank"):
        _print_bank(report["bank"], where, console)
    ex = report.get("example")
    if ex:
        from ..trace import Trace

        console.print(f"\none solved problem, {ex['problem']} = {ex['answer']}, by {ex['graph']}:")
        console.print(f"  {escape(ex['text'])}")
        Trace(ex["graph"], ex["trace"]).render(console, title=f"trace ({ex['graph']})")
    if sys.stdout.isatty():
        console.print("[dim]--json for the full report; `kilolora demo --help` for the options[/dim]")


def _print_bank(bank: dict, where: str, console: Console) -> None:
    u = bank["users"]
    t = Table(title=f"the bank: {u['requests']:,} users, {u['distinct_adapters']:,} adapters, one batch ({where})")
    for col, just in (("served by", "left"), ("accuracy", "right"), ("tasks", "right"), ("verifiers", "right"),
                      ("wall s", "right")):
        t.add_column(col, justify=just)

    def cell(x):
        return "" if x is None else f"{x:.3f}"

    for v in ("bank", "uncompressed", "base"):
        if u["accuracy"].get(v) is not None:
            r = u["by_role"][v]
            t.add_row(v, cell(u["accuracy"][v]), cell(r["task"]), cell(r["verifier"]), f"{u['wall_s'][v]:.1f}")
        elif v == "uncompressed":
            rec = (u.get("recorded_at_build") or {}).get("uncompressed")
            t.add_row("uncompressed [dim](recorded at build)[/dim]" if rec is not None else
                      "uncompressed [dim](not in this world)[/dim]", cell(rec), "", "", "")
    console.print(t)
    steps = f" ({u['engine_steps']} engine steps)" if u.get("engine_steps") is not None else ""
    console.print(f"  one held-out request per bank entry, all submitted together{steps}: {u['tasks']} task adapters "
                  f"answer (greedy, exact match), {u['verifiers']} per-task verifiers judge an answer "
                  f"(P(yes) > 0.5 against the label)")
    if u["uncompressed_source"] != "live":
        console.print("  [dim]this world ships without its uncompressed adapters: their row is what `kilolora world "
                      "build` measured on its held-out split, not this run's requests[/dim]")
    th = u.get("throughput")
    if th:
        console.print(f"decode throughput, {th['requests']:,} requests x {th['decode_tokens_per_request']} tokens "
                      f"({th['tokens_per_pass']:,} per pass, best of {th['repeats']}, alternating): bank "
                      f"{th['bank_tok_s']:,.0f} tok/s ({th['distinct_adapters']:,} adapters), base alone "
                      f"{th['base_tok_s']:,.0f} tok/s: bank/base = {th['ratio']:.2f}")
    else:
        console.print(f"decode throughput: {escape(u.get('throughput_note', 'not measured'))}")
    v = bank.get("verifiers")
    if v:
        console.print(f"per-task verifiers at work, {v['tasks']} tasks (a held-out input each): best-of-{v['n']} "
                      f"(T = 1) picked by each task's own verifier {v['best_of_n_accuracy']:.3f} vs greedy "
                      f"{v['greedy_accuracy']:.3f} (pass@{v['n']} {v['pass_at_n']:.3f}; {v['rescued']} rescued, "
                      f"{v['lost']} lost); each verifier call computes {v['prefilled_per_call']:.1f} tokens over "
                      f"{v['reused_per_call']:.0f} cached ones (the answer a standard task adapter wrote is "
                      f"recomputed under the base, which the verifier reads)")
    else:
        console.print("per-task verifiers: this world has none in its bank")
