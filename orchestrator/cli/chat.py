"""`kilolora chat`: an interactive chat in the terminal (prompt_toolkit for the line, rich for output).

A dim line first says what the message was read as and which skills run on it (`ChatSession.read`).
Each step of the answer is one line, labelled with the adapter that wrote it, its tokens streamed
as they come; tool calls show the tool selector's proposal and the calculator's result; the
verifier's score (or a task's own verifier's) closes the turn. Not a terminal (a pipe): lines are
read from stdin, one message or command per line, with the same output.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

HELP = """commands:
  /help            this help
  /reset           forget the conversation
  /adapter NAME    answer with adapter NAME from now on (/adapter base: the base model)
  /adapters [TEXT] list the served adapters (those containing TEXT)
  /trace           the last turn's trace: every node, adapter switch, tool call and score
  /quit            leave (Ctrl-D and Ctrl-C leave too)
anything else is a message; arrow keys walk the history"""

LABEL = 14


class _View:
    """Turns executor events and streamed text into the step lines of one turn."""

    def __init__(self, console: Console):
        self.console = console
        self.open = False
        self.streaming: tuple | None = None
        """(branch, node) whose tokens the open line shows"""
        self.pending = ""
        """a tool insertion shown at the start of the next step's line"""

    def _start(self, label: str, style: str) -> None:
        self.end()
        label = label.ljust(LABEL) if len(label) < LABEL else label + " "
        self.console.print(f"  [{style}]{escape(label)}[/{style}]", end="")
        self.open = True

    def end(self) -> None:
        if self.open:
            self.console.print()
        self.open, self.streaming = False, None

    def _step(self, key: tuple, adapter: str) -> None:
        self._start(adapter, "green" if adapter == "base" else "magenta")
        self.streaming = key
        if self.pending:
            self.console.print(f"[cyan]{escape(self.pending)}[/cyan]", end="")
            self.pending = ""

    def on_text(self, d: dict) -> None:
        if d["kind"] != "generate":
            return  # skills' outputs are shown from their events
        key = (d["branch"], d["node"])
        if self.streaming != key:
            self._step(key, d["adapter"])
        self.console.print(d["text"], end="", markup=False, highlight=False)
        self.console.file.flush()

    def on_event(self, e: dict) -> None:
        ev = e["event"]
        if ev == "route":
            self.end()
            self.console.print(f"  [dim]{escape(e['note'])}[/dim]", soft_wrap=True)  # one line, greppable in a pipe
        elif ev == "node" and e["kind"] == "generate":
            key = (e["branch"], e["node"])
            if self.streaming != key and e.get("output"):  # a backend that does not stream
                self._step(key, e.get("adapter") or "base")
                self.console.print(e["output"], end="", markup=False, highlight=False)
            self.end()
        elif ev == "node" and e["kind"] == "ask" and "[CALC]" in (e.get("output") or ""):
            self._start(e.get("adapter") or "tool_selector", "magenta")
            self.console.print(f"proposes [cyan]{escape(e['output'])}[/cyan]")
            self.open = False
        elif ev == "tool" and e.get("purpose") == "evidence":
            self._start(e["tool"], "dim cyan")
            self.console.print(f"[dim]checks {escape(e['input'])} -> {escape(e['output'])}[/dim]")
            self.open = False
        elif ev == "tool":
            self._start(e["tool"], "cyan")
            ok = "" if e["ok"] else " [red](error)[/red]"
            self.console.print(f"{escape(e['input'])} = [bold]{escape(e['output'])}[/bold]{ok}")
            self.open = False
            self.pending = f"[CALC]{e['input']}[/CALC]={e['output']}" if e["ok"] else ""
        elif ev == "score" and e.get("node") == "verify":  # the chat graph's final score
            v = e["value"]
            self._start(e["skill"], "yellow")
            mark = "[green]looks right[/green]" if v >= 0.5 else "[red]looks wrong[/red]"
            self.console.print(f"score {v:.2f}  {mark}")
            self.open = False


def chat(*, url: str | None = None, world: str | None = None, adapter: str = "base", turns: int = 0,
         no_tools: bool = False, no_verify: bool = False, seed: int = 0, history: str | None = None) -> None:
    """Chat with the embedded world in the terminal, in-process or against `kilolora serve`.

    Each message is first read as an arithmetic problem of the world's form (`58*63-17`, also
    "What is 58*63-17?"), a transformation (`shift 3: hello`), or anything else, and only the
    skills that fit run: for arithmetic the answer is written step by step, before each step the
    tool selector may propose a calculator call, which is run by the safe calculator and
    inserted, and the verifier scores the final answer; a transformation is answered by the task
    adapter that performs it (and scored by its own verifier where the world has one); anything
    else by the base alone. A dim line says which. Every step shows the adapter that wrote it and
    tokens stream as they are generated. Type /help for the commands (/reset, /adapter NAME,
    /trace, /quit). Ctrl-D or Ctrl-C leaves.

    Args:
      url: an OpenAI-compatible server serving the same world, e.g. http://127.0.0.1:8000/v1
        (default: run the world in-process)
      world: a world directory (default: the embedded one)
      adapter: the adapter that writes answers (base: the base model)
      turns: earlier turns the model sees with each message (the embedded world's model is
        trained on single questions, so it answers best with 0)
      no_tools: answer without the tool selector and calculator
      no_verify: skip the verifiers' scores (the arithmetic verifier's and the tasks' own)
      seed: seed of sampling (answers are greedy unless retried)
      history: file keeping the input history (default: ~/.kilolora/chat_history)
    """
    from skills.tasks import parse_answer
    from skills.world import World

    from ..world import world_chat

    console = Console(highlight=False)
    view = _View(console)
    w = World.load(world)
    where = url or "in-process"
    if turns < 0:
        raise ValueError(f"--turns must be >= 0, got {turns}")
    session = world_chat(w, url, tools=not no_tools, verify=not no_verify, seed=seed, turns=turns,
                         on_event=view.on_event, on_text=view.on_text)
    session.set_adapter(adapter)
    console.print(f"[bold]kilolora chat[/bold] · world {escape(str(w.path.name))} · {escape(where)} · "
                  f"{len(session.available)} adapters · /help for commands, Ctrl-D to leave")
    read = _reader(history)
    while True:
        try:
            line = read(f"you [{session.adapter or 'base'}] › ")
        except (EOFError, KeyboardInterrupt):
            console.print("bye")
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if _command(line, session, console):
                return
            continue
        try:
            run = session.turn(line)
        except KeyboardInterrupt:
            view.end()
            console.print("[red]interrupted[/red]")
            continue
        except (ValueError, RuntimeError) as err:
            view.end()
            console.print(f"[red]error:[/red] {escape(str(err))}")
            continue
        view.end()
        answer = parse_answer(run.text) if session.route.kind == "arithmetic" else \
            run.text.strip() if session.route.kind == "transform" else None
        if answer is not None:
            console.print(f"  [bold]{'answer'.ljust(LABEL)}{escape(str(answer))}[/bold]")


def _command(line: str, session, console: Console) -> bool:
    """Run a /command; True means leave."""
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    if cmd in ("/quit", "/exit"):
        console.print("bye")
        return True
    if cmd == "/help":
        console.print(escape(HELP))
    elif cmd == "/reset":
        session.reset()
        console.print("conversation cleared")
    elif cmd == "/adapter":
        if not arg:
            console.print(f"answering with {session.adapter or 'base'}; /adapter NAME to change")
        else:
            try:
                session.set_adapter(arg)
                console.print(f"answering with {session.adapter or 'base'}")
            except ValueError as err:
                console.print(f"[red]error:[/red] {escape(str(err))}")
    elif cmd == "/adapters":
        names = sorted(a for a in session.available if arg in a)
        console.print(f"{len(names)} adapters: " + escape(", ".join(names[:60])) + (" ..." if len(names) > 60 else ""))
    elif cmd == "/trace":
        if session.last is None:
            console.print("no turn yet")
        else:
            console.print(f"[dim]{escape(session.route.note)}[/dim]", soft_wrap=True)
            session.last.trace.render(console, title="trace of the last turn")
    else:
        console.print(f"[red]unknown command {escape(cmd)}[/red]; /help lists them")
    return False


def _reader(history: str | None):
    """prompt_toolkit with a history file on a terminal; plain lines from a pipe."""
    if not sys.stdin.isatty():
        def read_line(prompt: str) -> str:
            line = sys.stdin.readline()
            if not line:
                raise EOFError
            return line

        return read_line
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory

    path = Path(history) if history is not None else Path(os.path.expanduser("~/.kilolora/chat_history"))
    path.parent.mkdir(parents=True, exist_ok=True)
    session = PromptSession(history=FileHistory(str(path)))
    return session.prompt
