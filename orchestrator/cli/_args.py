"""Build argparse parsers from plain functions: the signature and docstring are the help.

A parameter without a default is positional (`list[str]` takes one or more values), and so is a
positional-only one with a default (optional: `[NAME]`); one with a default becomes `--name` (`bool` a flag, `Literal[...]` a choice); a keyword-only one
without a default is a required `--name`. The docstring's first
paragraph is the description, its `Args:` section the per-parameter help. Same idea as
litgpt's `__main__.py`, without a dependency.
"""

from __future__ import annotations

import argparse
import inspect
import re
import types
import typing
from collections.abc import Callable

SHORT_FLAGS = {"out": "-o", "name": "-n", "json": "-j", "from_stage": "--from"}
"""Short aliases for common options (`from_stage`: `from` is a Python keyword)."""


def _doc_parts(fn: Callable) -> tuple[str, str, dict[str, str]]:
    doc = inspect.getdoc(fn) or ""
    body, _, args_text = doc.partition("\nArgs:\n")
    summary = body.strip().split("\n\n")[0].replace("\n", " ")
    helps: dict[str, str] = {}
    current = None
    for line in args_text.splitlines():
        m = re.match(r"\s{2,4}(\w+):\s*(.*)", line)
        if m:
            current = m.group(1)
            helps[current] = m.group(2)
        elif current and line.strip():
            helps[current] += " " + line.strip()
    return summary, body.strip(), helps


def add_function(subparsers, name: str, fn: Callable) -> argparse.ArgumentParser:
    summary, description, helps = _doc_parts(fn)
    p = subparsers.add_parser(
        name, help=summary, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    hints = typing.get_type_hints(fn)
    for param in inspect.signature(fn).parameters.values():
        if param.name == getattr(fn, "passthrough", None):  # filled with the unknown flags (cli.main)
            continue
        hint = hints.get(param.name, str)
        help_text = helps.get(param.name, "")
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is typing.Union or origin is types.UnionType:  # `X | None`: an optional X
            hint = next(a for a in args if a is not type(None))
            origin, args = typing.get_origin(hint), typing.get_args(hint)
        kwargs: dict = {"help": help_text}
        if origin is list:
            kwargs["type"] = args[0] if args else str
            kwargs["nargs"] = "+" if param.default is inspect.Parameter.empty else "*"
        elif origin is typing.Literal:
            kwargs["choices"] = list(args)
            kwargs["type"] = type(args[0])
        elif hint is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = hint
        keyword_only = param.kind is inspect.Parameter.KEYWORD_ONLY
        if param.kind is inspect.Parameter.POSITIONAL_ONLY and param.default is not inspect.Parameter.empty:
            kwargs.update(metavar=param.name.upper(), nargs="?", default=param.default)  # an optional positional
            p.add_argument(param.name, **kwargs)
        elif param.default is inspect.Parameter.empty and not keyword_only:
            kwargs["metavar"] = param.name.upper()
            p.add_argument(param.name, **kwargs)
        else:
            flags = ["--" + param.name.replace("_", "-")]
            if param.name in SHORT_FLAGS:
                flags.insert(0, SHORT_FLAGS[param.name])
            if param.default is inspect.Parameter.empty:  # keyword-only, no default: required option
                kwargs["required"] = True
            elif hint is not bool:
                kwargs["default"] = param.default
                if param.default is not None and param.default != [] and param.default != "":
                    kwargs["help"] = f"{help_text} (default: {param.default})".strip()
            p.add_argument(*flags, dest=param.name, **kwargs)
    p.set_defaults(_fn=fn)
    if getattr(fn, "passthrough", None) is not None:
        p.set_defaults(_known=frozenset(p._option_string_actions))
    return p


def split_passthrough(argv: list[str], known: frozenset[str]) -> tuple[list[str], list[str]]:
    """(the arguments the command's parser takes, the flags passed on): a `--flag` the parser does
    not know goes on with the values that follow it (up to the next `-...`), as does everything
    after `--`. So a positional must come before the passed-on flags (or they use `--flag=value`)."""
    kept, passed = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            passed += argv[i + 1:]
            break
        if a.startswith("--") and a.split("=", 1)[0] not in known:
            passed.append(a)
            i += 1
            while "=" not in a and i < len(argv) and not argv[i].startswith("-"):
                passed.append(argv[i])
                i += 1
            continue
        kept.append(a)
        i += 1
    return kept, passed
