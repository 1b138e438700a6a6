"""The markup tool format's choice: the model generates step by step, and at each step boundary
(and at the start of a turn) the proposer adapter is asked, on a fork of the sequence, whether to
call the tool now (`tool_formats.MarkupTools`). The orchestrator's tool insertion
(`orchestrator/strategies.py`) runs the same loop as a graph; this is the HTTP server's copy.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from ..sampling import SamplingParams
from .responses import Choice
from .tool_formats import Call, MarkupTools

if TYPE_CHECKING:
    from .serving import Emit, Prepared, Serving


async def markup_choice(srv: Serving, seq: int, params: SamplingParams, prep: Prepared, index: int,
                        emit: Emit | None, ch: Choice) -> Choice:
    """Steps of the model between tool-call decisions (see `tool_formats.MarkupTools`)."""
    fmt: MarkupTools = prep.tools
    forced = prep.tool_choice == "required" or prep.tool_choice.startswith("function:")
    # after a tool result that ends its step (`result_suffix`), the next step starts at a boundary
    boundary = not prep.continues or bool(fmt.result_suffix) and fmt.result_suffix == fmt.step_stop
    user_stops = list(params.stop)
    while True:
        left = params.max_tokens - ch.tokens
        if left <= 0:
            ch.finish_reason = "length"
            return ch
        if boundary and (fmt.proposer is not None or forced):
            call = await propose(srv, seq, fmt, forced, ch)
            if call is not None:
                ch.tool_calls, ch.finish_reason = [call], "tool_calls"
                return ch
        p = replace(params, max_tokens=left, stop=user_stops + [fmt.step_stop, fmt.open],
                    min_tokens=max(0, min(left, params.min_tokens - ch.tokens)))  # min_tokens counts the whole choice
        text, stop_reason, finish = await srv.generate(seq, p, prep.adapter, index, emit, ch)
        ch.text += text
        if stop_reason in user_stops or stop_reason not in (fmt.step_stop, fmt.open):  # a user stop, EOS, length
            ch.text += await srv.kept_stop(prep, stop_reason, index, emit)
            ch.finish_reason = finish
            ch.stop_reason = stop_reason if isinstance(stop_reason, (str, int)) else None
            return ch
        if stop_reason == fmt.step_stop:
            ch.text += fmt.step_stop
            if emit is not None:
                await emit(index, fmt.step_stop, None)
            boundary = True
            continue
        # the model writes the call itself
        room = srv.max_model_len - await srv.ae.op("length", seq)
        if room <= 0:
            ch.finish_reason = "length"
            return ch
        rest = replace(params, max_tokens=min(fmt.max_call_tokens, room), stop=[fmt.close], temperature=0.0,
                       min_tokens=0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, min_p=0.0,
                       logprobs=None)
        arg, _, finish = await srv.generate(seq, rest, prep.adapter, index, None, ch)
        if finish != "stop":  # cut off before the call was complete: no call to make
            ch.finish_reason = "length"
            return ch
        ch.tool_calls, ch.finish_reason = [fmt.parse(fmt.open + arg)], "tool_calls"
        return ch


async def propose(srv: Serving, seq: int, fmt: MarkupTools, forced: bool, ch: Choice) -> Call | None:
    """Ask the proposer (on a fork: the sequence is unchanged) whether to call the tool now.
    Forced: the call is started for it (or, with no proposer, written on the sequence itself).
    None when it proposes none, when its call would be cut off unfinished, or when the context
    has no room left for a call."""
    prefix = (fmt.invocation if fmt.proposer is not None else "") + (fmt.open if forced else "")
    ids = list(srv.tokenizer.encode(prefix, add_special_tokens=False))
    # the sequence the call is written on: a fork (the proposer's), or `seq` itself; None: no room
    f = await srv.ae.op("start_call", seq, ids, fmt.proposer is not None, undo="close" if fmt.proposer else None)
    if f is None:
        return None
    p = SamplingParams(max_tokens=fmt.max_call_tokens, temperature=0.0, stop=[fmt.close])
    if fmt.proposer is None:  # forced, and the model writes calls itself
        adapter = await srv.ae.op("adapter_of", seq)
        arg, _, finish = await srv.generate(seq, p, adapter, 0, None, ch)
        return fmt.parse(fmt.open + arg) if finish == "stop" else None
    try:
        scratch = Choice()
        text, _, finish = await srv.generate(f, p, fmt.proposer, 0, None, scratch)
    finally:
        srv.ae.close_nowait(f)
    call = fmt.parse((fmt.open if forced else "") + text)
    if call is None or finish != "stop":  # no call, or one cut off unfinished (at the close marker or
        return None                        # the end of sequence, the proposer has finished its call)
    if not forced and not fmt.well_formed(call):  # `[CALC][CALC]...`: not a call, however it starts
        return None
    ch.tokens += scratch.tokens
    return call
