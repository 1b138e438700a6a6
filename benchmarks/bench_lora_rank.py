"""Which LoRA recipe learns the world's task family: held-out accuracy of a small family (10 shift,
5 add, 45 replace adapters) trained jointly on the shipped base, per (r, lora_alpha, lr), same data
and steps, side by side in one run with the ratio to the first recipe.

    python benchmarks/bench_lora_rank.py                                   # r=2 a=4 vs r=16 a=32 / a=8
    python benchmarks/bench_lora_rank.py --recipes 2:4:4e-3 16:8:4e-3 --steps 300

Recorded (2026-12-01, 2-core VM, 300 steps, task batch 96, 480 held-out inputs): r=2 alpha=4
0.869; r=16 alpha=32 (same alpha/r) 0.794; r=16 alpha=8 (alpha/sqrt(r) = 2, rslora's scale of the
r=2 recipe) 0.931. Rank 16 needs its scaling lowered, not its rank.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.engine import Engine  # noqa: E402
from serving.sampling import SamplingParams  # noqa: E402
from skills import build as B  # noqa: E402
from skills import data  # noqa: E402
from skills.world import World  # noqa: E402


def run(world: World, tok, r: int, alpha: float, lr: float, steps: int, per_task: int) -> tuple[float, float]:
    cfg = B.BuildConfig(r=r, lora_alpha=alpha, adapter_lr=lr, n_shift=10, n_add=5, n_replace=45, n_checkers=0,
                        adapter_steps=steps, skill_batch=8, task_batch=96)
    samples = [data.Sample(p, p.solution(), True) for p in B.problems(100, 0, "train")]
    t = time.perf_counter()
    multi, _ = B.train_adapters(world.base_dir, tok, samples, cfg, None)
    seconds = time.perf_counter() - t
    tasks, _ = B.family(cfg)
    engine = Engine.from_pretrained(world.base_dir, kv_cache_tokens=1 << 16)
    for j, task in enumerate(tasks):
        engine.add_adapter(task.name, multi.adapter(len(B.SKILLS) + j, task.name, {"r": r, "lora_alpha": alpha}))
    enc = data.Encoder(tok)
    prompts, adapters, want = [], [], []
    for task in tasks:
        for x in task.inputs(per_task, 0, "test"):
            prompts.append(enc.prompt(task.prompt(x)))
            adapters.append(task.name)
            want.append(task.apply(x))
    outs = engine.generate(prompts, adapters, SamplingParams(temperature=0, max_tokens=16))
    return sum(o.text == w for o, w in zip(outs, want)) / len(want), seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", nargs="+", default=["2:4:4e-3", "16:32:4e-3", "16:8:4e-3"], help="r:lora_alpha:lr")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--per-task", type=int, default=8, help="held-out inputs per task")
    a = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    from transformers import AutoTokenizer

    world = World.load()
    tok = AutoTokenizer.from_pretrained(str(world.base_dir))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {a.steps} steps, 60 task adapters")
    rows = []
    for spec in a.recipes:
        r, alpha, lr = spec.split(":")
        acc, s = run(world, tok, int(r), float(alpha), float(lr), a.steps, a.per_task)
        rows.append((spec, acc, s))
        base = rows[0][1]
        print(f"  r:alpha:lr {spec:<12} held-out accuracy {acc:.3f}  vs first {acc / base if base else float('nan'):.2f}x"
              f"  train {s:.0f} s", flush=True)


if __name__ == "__main__":
    main()
