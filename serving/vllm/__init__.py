"""kilolora on vLLM: `kilolora serve --engine vllm` and the LoRA resolver plugin it relies on.

- `launch.py`: finds the vLLM venv, builds vLLM's `serve` command line and environment, execs it.
- `catalog.py`: the names served (skills, `--adapter`s, bank entries) → PEFT directories vLLM
  loads; activated adapters stripped to plain LoRAs, bank entries exported on first use.
- `plugin.py`: the `vllm.general_plugins` entry point registering a `LoRAResolver` over the
  catalog (imports vLLM; only vLLM's processes load it).

Nothing in this package is imported by the rest of `serving`, and only `plugin.py` imports vLLM.
"""
