"""`kilolora serve` from a client's side: the embedded world behind an OpenAI-compatible API, used
with the official `openai` client (chat, streaming, adapters by model name, a tool-call round
trip), then the same best-of-n graph run in-process and over HTTP.

    python examples/openai_server.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from openai import OpenAI

from orchestrator.http_backend import HttpBackend
from orchestrator.strategies import answer_of, best_of_n_graph
from orchestrator.tools import calculate
from orchestrator.world import world_executor

with socket.socket() as s:  # a free port
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
server = subprocess.Popen([str(Path(sys.executable).with_name("kilolora")), "serve", "--port", str(port)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.DEVNULL)
url = f"http://127.0.0.1:{port}"
try:
    for _ in range(600):  # wait until it answers
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    client = OpenAI(base_url=url + "/v1", api_key="none")
    models = [m.id for m in client.models.list().data]
    print(f"{len(models)} models: {models[:5]} ...")

    question = [{"role": "user", "content": "37*49+12"}]
    r = client.chat.completions.create(model="base", messages=question, temperature=0)
    print("base alone:    ", r.choices[0].message.content)
    print("streamed:      ", "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="base", messages=question, temperature=0, stream=True) if c.choices))
    task = [{"role": "user", "content": "replace: hello"}]  # the adapter `replace-lx` knows which letters
    for model in ("base", "replace-lx", "base:replace-lx"):
        r = client.chat.completions.create(model=model, messages=task, temperature=0, max_tokens=12)
        print(f"{model:14s}:", r.choices[0].message.content)

    # tool calling: the server's tool selector proposes calculator calls; the client runs them
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {
        "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]
    messages = list(question)
    for _ in range(4):
        r = client.chat.completions.create(model="base", messages=messages, tools=tools, temperature=0)
        msg = r.choices[0].message
        messages.append(msg.model_dump(exclude_none=True))
        if r.choices[0].finish_reason != "tool_calls":
            break
        for call in msg.tool_calls:
            expr = json.loads(call.function.arguments)["expression"]
            result = calculate(expr)
            print(f"  tool call:    calculator({expr}) = {result}")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": str(result)})
    print("with the tool: ", r.choices[0].message.content,
          f"(last request: {r.usage.prompt_tokens} prompt tokens, {r.usage.completion_tokens} generated)")

    # the same graph, in-process and over HTTP
    problems = ["37*49+12", "58*6+31", "45*6-7"]
    for name, ex in [("in-process", world_executor()), ("over HTTP", world_executor(backend=HttpBackend(url + "/v1")))]:
        runs = ex.run_many(best_of_n_graph(4), problems, seed=0)
        print(f"best-of-4 {name:10s}:", [answer_of(r.state) for r in runs], "expected", [calculate(p) for p in problems])
finally:
    server.terminate()
    server.wait(timeout=15)
