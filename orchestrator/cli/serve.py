"""`kilolora serve`: the OpenAI-compatible server (see `serving.openai.api_server`)."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path
from typing import Literal

API_KEY_ENV = "KILOLORA_API_KEY"


def serve(model_dir: str | None = None, /, *, bank: str | None = None, adapter: list[str] = [],
          host: str = "127.0.0.1", port: int = 8000, tool_format: Literal["auto", "markup", "hermes", "none"] = "auto",
          served_model_name: str = "base", kv_cache_tokens: int = 65536, max_batch_tokens: int = 2048,
          device: str = "cpu", api_key: str | None = None, allow_adapter_updates: bool = False,
          max_lora_rank: int = 64, max_running: int = 512, request_timeout: float = 30.0,
          log_level: Literal["critical", "error", "warning", "info", "debug"] = "warning") -> None:
    """Serve a base model and its adapters behind an OpenAI-compatible API.

    With no MODEL_DIR it serves the embedded default world: the base, its skills (verifier,
    self_eval, tool_selector) and the task bank, with OpenAI tool calls for a `calculator`
    function (the tool selector proposes calls at step boundaries). MODEL_DIR may be a HF
    checkpoint directory, a world directory, or a `.gguf` file (converted once to a checkpoint
    through transformers and cached by its sha256 under $KILOLORA_CACHE/gguf, default
    ~/.cache/kilolora/gguf). Endpoints: /v1/models, /v1/completions,
    /v1/chat/completions (stream, n, logprobs, tools), /v1/load_lora_adapter,
    /v1/unload_lora_adapter, /tokenize, /detokenize, /health, /metrics. The `model` field picks
    the adapter: `base`, `NAME` or `base:NAME`. Only local directories are ever loaded.

    Security: bind a non-loopback --host only with an API key (--api-key or the environment
    variable KILOLORA_API_KEY; clients send `Authorization: Bearer KEY`). Runtime adapter
    loading is off unless --allow-adapter-updates; the skills, the tool selector and bank entries
    can never be unloaded or replaced. Request sizes, sequences in flight and adapter ranks are
    bounded (see the README's Security section).

    Args:
      model_dir: HF checkpoint or world directory, or a .gguf file (default: the embedded world)
      bank: a compressed bank directory to serve (its adapters by name)
      adapter: PEFT adapters to serve, as NAME=DIR (one or more)
      host: interface to listen on
      port: TCP port
      tool_format: how the model writes tool calls: markup ([CALC]...[/CALC], the world's), hermes
        (<tool_call> JSON), none; auto picks markup for a world and hermes for a chat template
        that renders tools
      served_model_name: the base model's id in the API
      kv_cache_tokens: KV cache capacity in tokens
      max_batch_tokens: most tokens in one engine step
      device: cpu or cuda
      api_key: require `Authorization: Bearer KEY` on every route but /health, /ping, /version and /metrics (as vLLM)
        (default: $KILOLORA_API_KEY; none: no authentication)
      allow_adapter_updates: enable /v1/load_lora_adapter and /v1/unload_lora_adapter (local
        directories only; anyone who can reach the server can then load files it can read)
      max_lora_rank: largest LoRA rank served; larger adapters are refused (memory grows with rank)
      max_running: sequences in flight at once (a request counts prompts x n); more get 503
      request_timeout: seconds a client may take to send a request's headers, and again its body
        (slower ones are cut off: 408 for a body)
      log_level: uvicorn's log level
    """
    from serving.engine import Engine
    from serving.openai.api_server import ServerLimits, create_app, local_dir
    from serving.openai.api_server import serve as run
    from serving.openai.tool_formats import dispatch_tool_format

    if not 0 < port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    if max_lora_rank < 1 or max_running < 1:
        raise ValueError(f"--max-lora-rank and --max-running must be >= 1, got {max_lora_rank}, {max_running}")
    if not 0 < request_timeout <= 3600:
        raise ValueError(f"--request-timeout must be in (0, 3600] seconds, got {request_timeout}")
    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    if api_key is None and not _loopback(host):
        print(f"kilolora: warning: serving on {host} without an API key: anyone who can reach it can use it "
              f"(set --api-key or {API_KEY_ENV})", file=sys.stderr, flush=True)
    pairs = {}
    for a in adapter:
        name, sep, path = a.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter takes NAME=DIR, got {a!r}")
        pairs[name] = str(local_dir(path, f"--adapter {name}"))
    engine_kw = dict(kv_cache_tokens=kv_cache_tokens, max_batch_tokens=max_batch_tokens, device=device,
                     max_lora_rank=max_lora_rank)
    world = None
    if model_dir is None or (Path(model_dir) / "world.json").is_file():
        from skills.world import World

        from ..world import world_tool_format

        world = World.load(model_dir)
        engine = world.engine(**engine_kw)
        if bank is not None:
            engine.load_bank(local_dir(bank, "--bank"))
    else:
        model = model_dir if Path(model_dir).suffix.lower() == ".gguf" else local_dir(model_dir, "MODEL_DIR")
        engine = Engine.from_pretrained(model, bank=bank and local_dir(bank, "--bank"), **engine_kw)
    for name, path in pairs.items():
        engine.load_adapter(name, path)
    fmt = dispatch_tool_format(tool_format, engine.tokenizer, world_tool_format(world) if world is not None else None)
    protected = {s.adapter for s in world.skills() if s.adapter} if world is not None else set()
    if fmt is not None and getattr(fmt, "proposer", None):
        protected.add(fmt.proposer)
    app = create_app(engine, model_name=served_model_name, tool_format=fmt,
                     limits=ServerLimits(max_running=max_running, body_timeout_s=request_timeout), adapter_roots=pairs, api_key=api_key,
                     allow_adapter_updates=allow_adapter_updates, protected_adapters=protected)
    what = f"world {world.path}" if world is not None else model_dir
    tools = f"tool calls: {fmt.describe()}" if fmt is not None else "no tool calls"
    print(f"kilolora: serving {what}: {served_model_name} + {len(engine.adapters)} adapters, {tools}\n"
          f"kilolora: OpenAI API at http://{host}:{port}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
    run(app, host=host, port=port, log_level=log_level, header_timeout_s=request_timeout)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
