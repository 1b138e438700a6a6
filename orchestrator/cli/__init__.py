"""The `kilolora` command: a map from command names to plain functions.

Each function's signature and docstring are its `--help` (see `_args.py`). Bad input raises
ValueError inside a command (or OSError from the file system); here it becomes one
`kilolora: error: ...` line and exit code 1.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import warnings
from collections.abc import Callable

from . import bank as bank_cmds
from . import chat as chat_cmds
from . import demo as demo_cmds
from . import serve as serve_cmds
from . import world as world_cmds
from ..http_backend import ServerError
from ._args import add_function, split_passthrough

COMMANDS: dict[str, Callable] = {
    "demo": demo_cmds.demo,
    "serve": serve_cmds.serve,
    "chat": chat_cmds.chat,
    "compress": bank_cmds.compress,
    "bank info": bank_cmds.bank_info,
    "bank export": bank_cmds.bank_export,
    "bank add": bank_cmds.bank_add,
    "make-collection": bank_cmds.make_collection,
    "world build": world_cmds.world_build,
    "world rebank": world_cmds.world_rebank,
    "world retrain": world_cmds.world_retrain,
    "world sweep": world_cmds.world_sweep,
    "world eval": world_cmds.world_eval,
}

GROUPS = {"bank": "inspect, export and grow a compressed adapter bank",
          "world": "build, retrain, recompress (and sweep banks of) and evaluate the embedded default world "
                   "(base model, skills, task bank)"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kilolora",
        description="Compress hundreds of LoRA adapters into one shared-basis bank and serve them.",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, fn in COMMANDS.items():
        if " " in name:
            group, leaf = name.split(" ", 1)
            if group not in groups:
                gp = sub.add_parser(group, help=GROUPS.get(group, ""), description=GROUPS.get(group))
                groups[group] = gp.add_subparsers(title=f"{group} commands", metavar="COMMAND", required=True)
            add_function(groups[group], leaf, fn)
        else:
            add_function(sub, name, fn)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None):
    return f"kilolora: warning: {message}\n"


def _one_line(e: Exception) -> str:
    if isinstance(e, KeyError) and e.args:  # str(KeyError) quotes its message
        return str(e.args[0])
    if isinstance(e, OSError) and e.strerror:  # "[Errno 36] File name too long: '...'" -> "PATH: File name too long"
        paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
        return f"{' -> '.join(paths)}: {e.strerror}" if paths else e.strerror
    return " ".join(str(e).split("\n"))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(argv) if argv is not None else sys.argv[1:]
    parsed, unknown = parser.parse_known_args(argv)
    args = vars(parsed)
    fn = args.pop("_fn")
    if getattr(fn, "passthrough", None) is not None:  # e.g. `serve --engine vllm`: flags for vLLM
        kept, passed = split_passthrough(argv, args["_known"])
        args = vars(parser.parse_args(kept))
        del args["_fn"], args["_known"]
        args[fn.passthrough] = passed
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    warnings.formatwarning = _one_line_warning
    positional = [args.pop(p.name) for p in inspect.signature(fn).parameters.values()
                  if p.kind is inspect.Parameter.POSITIONAL_ONLY]
    try:
        fn(*positional, **args)
    except (ValueError, KeyError, OSError, ServerError, ImportError) as e:  # ImportError: an optional dependency, with its install command
        print(f"kilolora: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kilolora: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
