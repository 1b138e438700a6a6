"""vLLM's side of `bench_real.py`: one offline `vllm.LLM` timed on given token-id prompts.

Run with the vLLM venv's interpreter (vLLM pins packages the main venv does not hold), never
imported by kilolora: `.venv-vllm/bin/python benchmarks/vllm_decode.py SPEC.json`. SPEC holds
`model`, `dtype`, `prompts` (token-id lists; batch b takes the first b), `batches`, `max_tokens`,
`repeats`, `rows` ([{"row": label, "n": adapters}]: n = 0 runs the batch without an adapter,
else sequence i gets adapter i mod n), `lora_dirs`, `enable_lora`, `max_loras`, `max_lora_rank`,
`max_model_len`. Each (row, batch) prints one line `@@result {json}` (or `@@error {json}` with the
reason, and the next row goes on) as it completes; the caller sets the environment (threads,
KV cache space, plugins).

Timing: greedy, `ignore_eos`, prefix caching off (so every run computes its prompts): `gen_s` is a
whole `generate` of `max_tokens` new tokens per sequence (prefill + decode), `one_s` the same
prompts with 1 new token; decode tokens/s = b·(max_tokens − 1) / (gen_s − one_s). A short warm-up
per (row, batch) loads its adapters and is not timed; medians of `repeats`.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import traceback


def emit(kind: str, obj: dict) -> None:
    print(f"@@{kind} {json.dumps(obj)}", flush=True)


def run(spec: dict) -> None:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    t0 = time.perf_counter()
    kw = {}
    if spec["enable_lora"]:
        kw = dict(enable_lora=True, max_loras=spec["max_loras"], max_cpu_loras=spec["max_loras"],
                  max_lora_rank=spec["max_lora_rank"])
    biggest = max(spec["batches"])
    prompt_tokens = sum(len(p) for p in spec["prompts"][:biggest])
    llm = LLM(model=spec["model"], dtype=spec["dtype"], seed=0, max_model_len=spec["max_model_len"],
              max_num_seqs=biggest, max_num_batched_tokens=max(prompt_tokens, spec["max_model_len"]),
              enable_prefix_caching=False, **kw)
    emit("info", {"system": "vllm", "version": vllm.__version__, "startup_s": time.perf_counter() - t0})
    T = spec["max_tokens"]

    def params(n):
        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    loras = [LoRARequest(f"a{i}", i + 1, d) for i, d in enumerate(spec["lora_dirs"])]
    first = True
    for row in spec["rows"]:
        for b in spec["batches"]:
            try:
                prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"][:b]]
                n = row["n"]
                lr = [loras[i % n] for i in range(b)] if n else None
                llm.generate(prompts, params(T if first else 4), lora_request=lr, use_tqdm=False)  # warm-up
                first = False
                gen, one, tokens = [], [], None
                for _ in range(spec["repeats"]):
                    t = time.perf_counter()
                    llm.generate(prompts, params(1), lora_request=lr, use_tqdm=False)
                    one.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    out = llm.generate(prompts, params(T), lora_request=lr, use_tqdm=False)
                    gen.append(time.perf_counter() - t)
                    tokens = [list(o.outputs[0].token_ids) for o in out]
                g, o = statistics.median(gen), statistics.median(one)
                emit("result", {"system": "vllm", "row": row["row"], "batch": b, "gen_s": gen, "one_s": one,
                                "gen_tok_s": b * T / g, "dec_tok_s": b * (T - 1) / (g - o) if g > o else None,
                                "tokens": tokens})
            except Exception as e:  # one row's failure (e.g. too many LoRAs) must not lose the others
                traceback.print_exc()
                emit("error", {"system": "vllm", "row": row["row"], "batch": b,
                               "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]})


if __name__ == "__main__":  # vLLM's CPU engine spawns processes that re-import this file
    if len(sys.argv) != 2:
        raise SystemExit("usage: vllm_decode.py SPEC.json (see the module docstring)")
    with open(sys.argv[1]) as f:
        run(json.load(f))
