"""How many examples a per-task verifier (`check-replace-*`: activated, rank 16, all seven
projections) needs to learn: held-out accuracy and AUROC of N checkers trained jointly on the
shipped base, per (examples per checker, lr), side by side in one run.

    python benchmarks/bench_checker_data.py                              # 24 checkers, 133 / 400 / 1200
    python benchmarks/bench_checker_data.py --examples 400 1200 --lrs 4e-3 1.2e-2 --rank 2 --alpha 4

Recorded (2026-12-01, 2-core VM, 24 checkers, batch 48, 40 held-out judgements each, r=16
alpha=8, lr 4e-3): 133 examples per checker (what the 1014-adapter build gave each of its 330)
AUROC 0.536, accuracy 0.523; 400: 0.595 / 0.561; 1200: 0.851 / 0.766. lr 1.2e-2: 0.506 (133),
0.511 (400). The activated verifier reads the context through the base's cache and adapts one
position: it needs ~10x the data the 1014-adapter build gave it.

A shared parent does not buy that data back (2026-12-01, same machine, 1 torch thread at nice 19
beside other work, on the 1014-adapter build's base; `--world /work/wb/default_world --examples
133 400 --parent-steps 0 400`): no parent 133 -> AUROC 0.530, 400 -> 0.570; a parent trained 400
steps on the mixed examples of 330 replace tasks, then 133 per checker -> 0.516 (its loss is lower,
0.715 vs 0.791, but it cannot know the pair, and what it learns does not separate right from wrong).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from skills import data  # noqa: E402
from skills.build import BuildConfig, family  # noqa: E402
from skills.tokenizer import NO, YES  # noqa: E402
from skills.train import IGNORE, MultiLora, TrainConfig, collate, fit, lora_loss, multi_lora_step  # noqa: E402
from skills.world import World  # noqa: E402


def auroc(pos: list[float], neg: list[float]) -> float:
    return sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))


def judge(model, multi: MultiLora, held: list, pad: int, yes: int, no: int) -> tuple[float, float]:
    """(accuracy, AUROC) of logit(yes) - logit(no) at each held-out example's answer."""
    scores = []
    with torch.no_grad():
        for i in range(0, len(held), 64):
            tokens, targets, adapter, mask = collate(held[i:i + 64], pad)
            multi.route(adapter, mask)
            keep = targets != IGNORE
            logits = model.logits(model.forward_train(tokens, multi)[keep])
            scores += zip((logits[:, yes] - logits[:, no]).tolist(), (targets[keep] == yes).tolist())
    pos, neg = [s for s, good in scores if good], [s for s, good in scores if not good]
    return sum((s > 0) == good for s, good in scores) / len(scores), auroc(pos, neg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=Path, default=None, help="world whose base trains them (default: the shipped one)")
    ap.add_argument("--checkers", type=int, default=24)
    ap.add_argument("--examples", type=int, nargs="+", default=[133, 400, 1200], help="examples per checker")
    ap.add_argument("--lrs", type=float, nargs="+", default=[4e-3])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=8)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--held-out", type=int, default=40, help="held-out judgements per checker")
    ap.add_argument("--parent-steps", type=int, nargs="+", default=[0],
                    help="steps of a shared parent verifier trained first on the examples of --parent-tasks "
                         "per-task verifiers mixed (plain prompts: it cannot know which pair), which every checker "
                         "then starts from (0: no parent, checkers start from PEFT's initialisation)")
    ap.add_argument("--parent-tasks", type=int, default=330, help="replace tasks whose examples train the parent")
    args = ap.parse_args()
    torch.manual_seed(0)
    from serving.model import load_model

    world = World.load(args.world)
    tok = world.tokenizer()
    enc = data.Encoder(tok)
    _, every = family(BuildConfig(n_replace=650, n_checkers=max(args.checkers, args.parent_tasks, 1)))
    checked = every[: args.checkers]
    n = len(checked)
    yes, no = tok.convert_tokens_to_ids(YES), tok.convert_tokens_to_ids(NO)
    rng = random.Random(123)
    held = [data.checker_example(enc, rng, checked[j], j) for j in range(n) for _ in range(args.held_out)]
    print(f"{n} checkers, r={args.rank} alpha={args.alpha}, batch {args.batch}, {len(held)} held-out judgements")
    print(f"{'parent':>6} {'lr':>8} {'examples':>9} {'steps':>6} {'loss':>6} {'accuracy':>9} {'AUROC':>6} {'seconds':>8}")
    for parent_steps, lr, per in ((p, lr, e) for p in args.parent_steps for lr in args.lrs for e in args.examples):
        if True:
            model = load_model(world.base_dir)
            multi = MultiLora(model, n, r=args.rank, lora_alpha=args.alpha, seed=0)
            steps = max(1, per * n // args.batch)
            t = time.perf_counter()
            if parent_steps:
                parent = MultiLora(model, 1, r=args.rank, lora_alpha=args.alpha, seed=0)
                pool = every[: args.parent_tasks]

                def mixed(rng: random.Random, _: int, pool=pool) -> list:
                    return [data.checker_example(enc, rng, rng.choice(pool), 0) for _ in range(args.batch)]

                def parent_loss(batch, model=model, parent=parent):
                    return lora_loss(model, parent, batch, tok.pad_token_id)

                tp = TrainConfig(steps=parent_steps, batch_size=0, lr=lr, warmup=min(50, parent_steps // 10), seed=5)
                fit(multi_lora_step(parent, parent_loss, lambda b: torch.zeros(len(b), dtype=torch.long)), mixed, tp,
                    "parent")
                for d, src in ((multi.lora_A, parent.lora_A), (multi.lora_B, parent.lora_B)):
                    for k in d:
                        d[k][:] = src[k][0]

            def sample(rng: random.Random, _: int) -> list:
                return [data.checker_example(enc, rng, checked[j], j) for j in (rng.randrange(n) for _ in range(args.batch))]

            def loss(batch, model=model, multi=multi):
                return lora_loss(model, multi, batch, tok.pad_token_id)

            tc = TrainConfig(steps=steps, batch_size=0, lr=lr, warmup=min(50, steps // 10), seed=3)
            losses = fit(multi_lora_step(multi, loss, lambda b: torch.tensor([e.adapter for e in b])), sample, tc, "checkers")
            acc, auc = judge(model, multi, held, tok.pad_token_id, yes, no)
            tail = sum(losses[-20:]) / len(losses[-20:])
            print(f"{parent_steps:>6} {lr:>8.1e} {per:>9} {steps:>6} {tail:>6.3f} {acc:>9.3f} {auc:>6.3f} {time.perf_counter() - t:>8.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
