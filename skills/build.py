"""`kilolora world build`: train the default world from a seed.

1. tokenizer (`tokenizer.py`), 2. base model pretrained on solutions (with and without tool
blocks) and instructed transformations, 3. the base's own sampled solutions, labelled,
4. every adapter at once — verifier, self-evaluation, tool selector and the task family — in one
`MultiLora` through the serving model's layers, 5. PEFT export, 6. the task family compressed
into one bank, 7. the manifest, 8. an evaluation recorded in the manifest. The stages work in a
sibling directory that keeps each finished stage's output (and the adapter stage's checkpoints),
so an interrupted build resumes where it stopped; the world moves into place only when
everything succeeded.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import data
from .evaluate import evaluate
from .spec import Skill
from .tasks import Transform, problems, transform_family
from .tokenizer import CHECK, SELECT, VERIFY, save_tokenizer
from .train import MultiLora, TrainConfig, adamw_step, base_loss, export_peft, fit, lora_loss, multi_lora_step, peft_config
from .world import FORMAT_VERSION, MANIFEST, World


@dataclass
class BuildConfig:
    """Sizes of a world build (the defaults are the shipped world)."""

    seed: int = 0
    """seed of everything: data, initialisation, sampling"""
    hidden_size: int = 256
    """base model width (the model is a Llama)"""
    num_layers: int = 4
    """decoder layers"""
    num_heads: int = 8
    """attention heads"""
    num_kv_heads: int = 4
    """key/value heads (GQA)"""
    intermediate_size: int = 768
    """MLP width"""
    base_steps: int = 2400
    """pretraining steps of the base model"""
    base_batch: int = 64
    """pretraining examples per step"""
    base_lr: float = 2e-3
    """pretraining peak learning rate"""
    n_shift: int = 25
    """`shift k` task adapters (k = 1..n)"""
    n_add: int = 9
    """`add k` task adapters (k = 1..n)"""
    n_replace: int = 650
    """`replace x y` task adapters (letter pairs in a seeded order; 650 is every ordered pair)"""
    n_checkers: int = 330
    """per-task verifiers (of the first `replace` tasks) in the task family"""
    sample_problems: int = 1500
    """training problems the base samples solutions for (verifier / self-eval labels)"""
    samples_per_problem: int = 4
    """sampled solutions per problem"""
    sample_temperature: float = 1.0
    """temperature of those samples"""
    adapter_steps: int = 1400
    """steps of the joint adapter training"""
    skill_batch: int = 48
    """skill examples per step (verifier 45%, self-eval 35%, tool selector 20%)"""
    task_batch: int = 352
    """task-family examples per step"""
    checker_share: float = 0.625
    """share of the task batch for the per-task verifiers (they learn from one answer token per
    example, the transformations from every character); the rest is drawn uniformly over tasks"""
    variety: float = 0.3
    """chance that a training conversation phrases its question in words, and (each) that it opens
    with a system prompt or an earlier turn: what lets the base and skills serve real chats (the
    task family trains on plain prompts, see `train_adapters`)"""
    contrast_share: float = 0.5
    """share of verifier / step-checker examples made from a right solution and its twin with one
    wrong digit (the rest: the base's own samples)"""
    adapter_lr: float = 4e-3
    """adapters' peak learning rate"""
    split_activated: bool = True
    """train activated examples (skills, per-task verifiers) on their invoked tokens only, their
    base prefix run without a graph (`lora_loss(split_activated=True)`: the same loss and gradients
    to float rounding, about half the time of a per-task verifier's example)"""
    r: int = 16
    """LoRA rank of every adapter (all seven projections). At rank 16 use lora_alpha 8 (alpha /
    sqrt(r) = 2): alpha / r = 2 learns worse (`benchmarks/bench_lora_rank.py`: 0.794 vs 0.931)"""
    lora_alpha: float = 8
    """LoRA alpha"""
    bank_rank: int = 16
    """rank of the task bank's shared bases"""
    bank_clusters: int = 16
    """clusters of the task bank"""
    bank_method: str = "jd-full"
    """compression method of the task bank"""
    bank_dtype: str = "bfloat16"
    """dtype the task bank is stored in"""
    eval_problems: int = 200
    """held-out problems of the evaluation recorded at build"""
    eval_per_task: int = 8
    """held-out inputs per task adapter in that evaluation"""

    @classmethod
    def quick(cls, seed: int = 0) -> BuildConfig:
        """A micro world for tests: every stage runs, in seconds."""
        return cls(seed=seed, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                   base_steps=40, base_batch=16, n_shift=2, n_add=1, n_replace=2, n_checkers=1, sample_problems=12,
                   samples_per_problem=2, adapter_steps=12, skill_batch=8, task_batch=8, r=4, lora_alpha=8,
                   bank_rank=4, bank_clusters=2, eval_problems=8, eval_per_task=3, variety=0.3)


SKILLS = [
    Skill(name="verifier", role="verifier", adapter="verifier", activation="activated", invocation=VERIFY,
          prompt="{context}" + VERIFY, output="yes_no", evidence="calculator",
          description="outcome reward model: is this finished solution's answer right? It reads the calculator's "
                      "check of the solution's claims (trained on the base's own samples and on right/wrong twins)"),
    Skill(name="self_eval", role="self_eval", adapter="self_eval", activation="activated", invocation=CHECK,
          prompt="{context}" + CHECK, output="yes_no", evidence="calculator",
          description="process reward: is the last step (ending with '.') right, given the steps before it? It reads "
                      "the calculator's check of the claims so far"),
    Skill(name="tool_selector", role="tool_selector", adapter="tool_selector", activation="activated",
          invocation=SELECT, prompt="{context}" + SELECT, output="text", stop=["[/CALC]"], max_tokens=24,
          description="at a step boundary, propose `[CALC] expr [/CALC]` for the next step, or nothing"),
]


def family(cfg: BuildConfig) -> tuple[list[Transform], list[Transform]]:
    """(task transforms, transforms that get a per-task verifier)."""
    tr = transform_family(cfg.n_shift, cfg.n_add, cfg.n_replace, seed=cfg.seed)
    return tr, [t for t in tr if t.family == "replace"][: cfg.n_checkers]


def task_skills(cfg: BuildConfig) -> list[Skill]:
    tr, checked = family(cfg)
    out = [Skill(name=t.name, role="task", adapter=t.name, task=t.instruction, output="text", max_tokens=16,
                 description=f"{t.instruction}: maps the user message to its transformation") for t in tr]
    out += [Skill(name=f"check-{t.name}", role="verifier", adapter=f"check-{t.name}", activation="activated",
                  invocation=VERIFY, prompt="{context}" + VERIFY, output="yes_no", task=t.instruction,
                  description=f"per-task verifier: is the answer the `{t.instruction}` of the message?")
            for t in checked]
    return out


def _loss_text(task) -> str:
    """'loss 0.123' for a training task; nothing for a phase that has no loss (NaN or absent)."""
    loss = task.fields.get("loss")
    return f"loss {loss:.3f}" if isinstance(loss, float) and math.isfinite(loss) else ""


def _progress(console=None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn
    from rich.text import Text

    class LossColumn(ProgressColumn):
        def render(self, task):
            return Text(_loss_text(task))

    return Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), LossColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)


def train_base(out: Path, tok, cfg: BuildConfig, progress) -> list[float]:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    mc = LlamaConfig(vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                     num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=512,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     tie_word_embeddings=False)
    model = LlamaForCausalLM(mc)
    enc = data.Encoder(tok, cfg.variety)
    train_problems = problems(20000 if cfg.base_steps > 100 else 200, cfg.seed, "train")
    tr, _ = family(cfg)
    sample = lambda rng, n: [data.base_example(enc, rng, train_problems, tr, cfg.seed) for _ in range(n)]  # noqa: E731
    tc = TrainConfig(steps=cfg.base_steps, batch_size=cfg.base_batch, lr=cfg.base_lr, warmup=min(100, cfg.base_steps // 10),
                     weight_decay=0.1, seed=cfg.seed)
    model.train()
    step = adamw_step(list(model.parameters()), lambda b: base_loss(model, b, tok.pad_token_id), tc.weight_decay)
    losses = fit(step, sample, tc, "base model", progress)
    model.eval()
    model.save_pretrained(str(out))
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(str(out))
    return losses


def sample_solutions(base_dir: Path, cfg: BuildConfig, split: str = "train", n_problems: int | None = None,
                     seed: int | None = None, progress=None) -> list[data.Sample]:
    """The base model's own solutions (temperature `sample_temperature`), `samples_per_problem` each."""
    from serving.engine import Engine
    from serving.sampling import SamplingParams

    engine = Engine.from_pretrained(base_dir, kv_cache_tokens=1 << 17)
    enc = data.Encoder(engine.tokenizer)
    seed = seed if seed is not None else cfg.seed + 1
    probs = problems(n_problems if n_problems is not None else cfg.sample_problems, seed, split)
    k = cfg.samples_per_problem
    out: list[data.Sample] = []
    chunk = 256
    task = progress.add_task("sampling solutions", total=len(probs) * k, loss=float("nan")) if progress else None
    jobs = [(p, j) for p in probs for j in range(k)]
    for i in range(0, len(jobs), chunk):
        part = jobs[i:i + chunk]
        params = [SamplingParams(max_tokens=72, temperature=cfg.sample_temperature, seed=seed * 1000003 + i + n)
                  for n in range(len(part))]
        comps = engine.generate([enc.prompt(p.question) for p, _ in part], params=params)
        out += [data.Sample(p, c.text, c.finish_reason == "stop") for (p, _), c in zip(part, comps)]
        if progress:
            progress.update(task, advance=len(part))
    return out


def train_adapters(base_dir: Path, tok, samples: list[data.Sample], cfg: BuildConfig, progress,
                   ckpt_dir: Path | None = None, every: int = 100):
    """All adapters in one MultiLora: rows 0..2 the skills, then the task family. With `ckpt_dir`
    the run is checkpointed there every `every` steps and resumed from its last checkpoint."""
    from serving.model import load_model

    model = load_model(base_dir)
    enc = data.Encoder(tok, cfg.variety)
    # the family trains on plain prompts: with variety its joint step over 1017 rank-16 adapters
    # took 6.0 s instead of 2.8 s (long system prompts and earlier turns), and the base it adapts
    # reads past those already
    plain = data.Encoder(tok)
    tr, checked = family(cfg)
    n_skills = len(SKILLS)
    multi = MultiLora(model, n_skills + len(tr) + len(checked), r=cfg.r, lora_alpha=cfg.lora_alpha, seed=cfg.seed)
    pools = _Pools(samples)
    sel_problems = problems(5000 if cfg.adapter_steps > 100 else 100, cfg.seed + 2, "train")

    def skill_batch(rng: random.Random, n: int) -> list:
        out = []
        for _ in range(n):
            u = rng.random()
            if u < 0.45:
                out.append(pools.example(enc, rng, "verifier", 0, cfg.contrast_share))
            elif u < 0.8:
                out.append(pools.example(enc, rng, "self_eval", 1, cfg.contrast_share))
            else:
                out.append(data.selector_example(enc, rng, rng.choice(sel_problems), 2))
        return out

    def task_batch(rng: random.Random, n: int) -> list:
        out = []
        for _ in range(n):
            if checked and rng.random() < cfg.checker_share:
                j = rng.randrange(len(checked))
                out.append(data.checker_example(plain, rng, checked[j], n_skills + len(tr) + j))
            else:
                j = rng.randrange(len(tr))
                out.append(data.task_example(plain, rng, tr[j], n_skills + j))
        return out

    def sample(rng, n):
        return skill_batch(rng, cfg.skill_batch), task_batch(rng, cfg.task_batch)

    pad = tok.pad_token_id
    parts: list[tuple[float, float]] = []
    resume = _load_checkpoint(ckpt_dir, multi) if ckpt_dir is not None else None
    if resume is not None:
        parts = [tuple(p) for p in resume["parts"]]

    def checkpoint(state: dict) -> None:
        _save_checkpoint(ckpt_dir, multi, {**state, "parts": parts})

    def loss(batches):
        skills, tasks = batches
        split = cfg.split_activated
        ls, lt = lora_loss(model, multi, skills, pad, split), lora_loss(model, multi, tasks, pad, split)
        parts.append((float(ls.detach()), float(lt.detach())))
        return ls + lt

    tc = TrainConfig(steps=cfg.adapter_steps, batch_size=0, lr=cfg.adapter_lr, warmup=min(50, cfg.adapter_steps // 10),
                     seed=cfg.seed + 3)
    ids = lambda batches: torch.tensor([e.adapter for b in batches for e in b])  # noqa: E731
    note = lambda: f"skills {_tail(parts_s, 20):.2f} tasks {_tail(parts_t, 20):.2f}"  # noqa: E731
    parts_s, parts_t = _Parts(parts, 0), _Parts(parts, 1)
    fit(multi_lora_step(multi, loss, ids), sample, tc, f"{multi.n} adapters", progress, note=note, resume=resume,
        checkpoint=checkpoint if ckpt_dir is not None else None, every=every)
    return multi, {"skills": [a for a, _ in parts], "tasks": [b for _, b in parts]}


def _save_checkpoint(ckpt_dir: Path, multi: MultiLora, state: dict) -> None:
    """Adapters, optimizer and loop state, written beside the last checkpoint and swapped in (a
    kill while writing leaves the previous one)."""
    from safetensors.torch import save_file

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    save_file(multi.state_dict(), str(ckpt_dir / "state.safetensors.new"))
    (ckpt_dir / "loop.json.new").write_text(json.dumps(state))
    os.replace(ckpt_dir / "state.safetensors.new", ckpt_dir / "state.safetensors")
    os.replace(ckpt_dir / "loop.json.new", ckpt_dir / "loop.json")


def _load_checkpoint(ckpt_dir: Path, multi: MultiLora) -> dict | None:
    from safetensors.torch import load_file

    if not (ckpt_dir / "loop.json").is_file() or not (ckpt_dir / "state.safetensors").is_file():
        return None
    state = json.loads((ckpt_dir / "loop.json").read_text())
    tensors = load_file(str(ckpt_dir / "state.safetensors"))
    if int(tensors["steps"].sum()) == 0 and state["step"] > 0 or len(state["losses"]) != state["step"]:
        raise ValueError(f"{ckpt_dir}: the checkpoint's tensors and loop state disagree; remove it or use --from adapters")
    multi.load_state_dict(tensors)
    return state


STAGES = ("base", "sampling", "adapters", "export", "eval")
"""build stages, in order; each keeps its output in the work directory, so a rerun skips it"""


def build(out: str | os.PathLike, cfg: BuildConfig | None = None, overwrite: bool = False, console=None,
          evaluate_after: bool = True, reuse_base: str | os.PathLike | None = None, from_stage: str | None = None,
          checkpoint_every: int = 100) -> World:
    """Build a world into `out` (see the module docstring); returns it loaded.

    Resumable: the stages (`STAGES`) work in `.<out>.build/` beside `out`, and each one's output
    stays there once it finished, so running the same build again (after a crash, a kill, a
    session's end) skips finished stages and resumes the adapter stage from its last checkpoint
    (every `checkpoint_every` steps). `from_stage` redoes that stage and every later one. The
    world moves to `out` when every stage is done, and the work directory is removed.
    `reuse_base`: take the base model from that checkpoint directory instead of pretraining it
    (a previous build's `base/` with the same seed and sizes; the manifest records it)."""
    cfg = cfg if cfg is not None else BuildConfig()
    out = Path(out)
    if from_stage is not None and from_stage not in STAGES:
        raise ValueError(f"--from must be one of {', '.join(STAGES)}, got {from_stage!r}")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = _Work(out.parent / f".{out.name}.build", cfg, from_stage, console)
    t0 = time.perf_counter()
    with _progress(console) as progress:
        if work.todo("base"):
            t = time.perf_counter()
            shutil.rmtree(work.path / "base", ignore_errors=True)
            tok = save_tokenizer(work.path / "base")
            if reuse_base is not None:
                _copy_base(Path(reuse_base), work.path / "base", cfg)
                base_losses = []
            else:
                base_losses = train_base(work.path / "base", tok, cfg, progress)
            work.done("base", t, final_loss=_tail(base_losses) if base_losses else None,
                      reused_from=str(reuse_base) if reuse_base is not None else None)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(work.path / "base"))
        if work.todo("sampling"):
            t = time.perf_counter()
            samples = sample_solutions(work.path / "base", cfg, progress=progress)
            (work.path / "samples.json").write_text(json.dumps([_sample_json(x) for x in samples]))
            work.done("sampling", t, samples=len(samples), correct=sum(x.correct for x in samples))
        samples = [_sample_from_json(x) for x in json.loads((work.path / "samples.json").read_text())]
        if work.todo("adapters"):
            t = time.perf_counter()
            multi, ad_losses = train_adapters(work.path / "base", tok, samples, cfg, progress,
                                              ckpt_dir=work.path / "adapters.ckpt", every=checkpoint_every)
            work.done("adapters", t, skills_final_loss=_tail(ad_losses["skills"]),
                      tasks_final_loss=_tail(ad_losses["tasks"]))
        if work.todo("export"):
            t = time.perf_counter()
            _export(work.path, tok, cfg, progress)
            work.done("export", t)
    if work.todo("eval"):
        t = time.perf_counter()
        manifest = _manifest(cfg, work)
        (work.path / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if evaluate_after:
            _evaluate_into(manifest, World.load(work.path), cfg.eval_problems, cfg.eval_per_task,
                           cfg.samples_per_problem, cfg.seed, console)
        manifest["build_seconds"]["total"] = round(sum(manifest["build_seconds"].values()), 1)
        (work.path / MANIFEST).write_text(json.dumps(manifest, indent=1))
        work.done("eval", t)
    world = work.finish(out)
    if console is not None:
        console.print(f"[dim]this run: {time.perf_counter() - t0:.0f} s[/dim]")
    return world


def _export(path: Path, tok, cfg: BuildConfig, progress) -> None:
    """PEFT directories of the skills and the task family, and the family's bank."""
    from serving.model import load_model

    multi = MultiLora(load_model(path / "base"), len(SKILLS) + len(task_skills(cfg)), r=cfg.r,
                      lora_alpha=cfg.lora_alpha, seed=cfg.seed)
    if _load_checkpoint(path / "adapters.ckpt", multi) is None:
        raise ValueError(f"{path / 'adapters.ckpt'} holds no trained adapters; rerun with --from adapters")
    for d in ("skills", "adapters", "bank"):
        shutil.rmtree(path / d, ignore_errors=True)
    inv = {VERIFY: tok.convert_tokens_to_ids(VERIFY), CHECK: tok.convert_tokens_to_ids(CHECK),
           SELECT: tok.convert_tokens_to_ids(SELECT)}
    base_ref = "base"
    for i, s in enumerate(SKILLS):
        export_peft(multi, i, path / "skills" / s.name, peft_config(base_ref, cfg.r, cfg.lora_alpha, [inv[s.invocation]]))
    adapters = []
    for j, s in enumerate(task_skills(cfg)):
        config = peft_config(base_ref, cfg.r, cfg.lora_alpha, [inv[s.invocation]] if s.invocation else None)
        export_peft(multi, len(SKILLS) + j, path / "adapters" / s.name, config)
        adapters.append(multi.adapter(len(SKILLS) + j, s.name, config))
    compress_family(adapters, BankConfig.of(cfg), progress).save(path / "bank")


def _manifest(cfg: BuildConfig, work: _Work) -> dict:
    fam = task_skills(cfg)
    st = work.records
    return {
        "format": FORMAT_VERSION, "name": "kilolora default world", "build": asdict(cfg),
        "skills": [s.model_dump(exclude_defaults=True) for s in SKILLS + fam],
        "tasks": [{"name": s.name, "role": s.role, "task": s.task} for s in fam],
        "training": {"base_final_loss": st["base"].get("final_loss"),
                     "skills_final_loss": st["adapters"]["skills_final_loss"],
                     "tasks_final_loss": st["adapters"]["tasks_final_loss"],
                     "samples": st["sampling"]["samples"], "samples_correct": st["sampling"]["correct"]},
        "build_seconds": {"base": st["base"]["seconds"], "sampling": st["sampling"]["seconds"],
                          "adapters": st["adapters"]["seconds"], "export_compress": st["export"]["seconds"]},
        "base_reused_from": st["base"].get("reused_from"),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }


class _Work:
    """A build's work directory: `config.json` (the BuildConfig it builds), and per finished stage
    `stages/NAME.json` (its seconds and figures). A different config refuses to reuse it unless
    told which stage to redo from."""

    def __init__(self, path: Path, cfg: BuildConfig, from_stage: str | None, console):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        (path / "stages").mkdir(exist_ok=True)
        want = asdict(cfg)
        conf = path / "config.json"
        have = json.loads(conf.read_text()) if conf.is_file() else None
        if have is not None and have != want and from_stage is None and any((path / "stages").iterdir()):
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            raise ValueError(f"{path} holds a build with other settings ({', '.join(diff)}); pass --from STAGE to "
                             f"redo from the first stage they change, or delete {path}")
        conf.write_text(json.dumps(want, indent=1))
        if from_stage is not None:
            for name in STAGES[STAGES.index(from_stage):]:
                (path / "stages" / f"{name}.json").unlink(missing_ok=True)
            if STAGES.index(from_stage) <= STAGES.index("adapters"):
                shutil.rmtree(path / "adapters.ckpt", ignore_errors=True)
        self.records = {p.stem: json.loads(p.read_text()) for p in (path / "stages").glob("*.json")}
        self.console = console
        finished = [n for n in STAGES if n in self.records]
        if finished and console is not None:
            console.print(f"[dim]resuming {path}: done {', '.join(finished)}[/dim]")

    def todo(self, stage: str) -> bool:
        return stage not in self.records

    def done(self, stage: str, started: float, **figures) -> None:
        rec = {"seconds": round(time.perf_counter() - started, 1), **figures}
        (self.path / "stages" / f"{stage}.json").write_text(json.dumps(rec))
        self.records[stage] = rec

    def finish(self, out: Path) -> World:
        """Move the world's parts into `out` (atomically: a sibling then a rename) and drop the rest."""
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            for part in ("base", "skills", "adapters", "bank", MANIFEST):
                os.rename(self.path / part, tmp / part)
            if out.exists():
                shutil.rmtree(out)
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(self.path, ignore_errors=True)
        return World.load(out)


def _sample_json(s: data.Sample) -> dict:
    p = s.problem
    return {"question": p.question, "steps": [[x.left, x.op, x.right] for x in p.steps], "text": s.text,
            "finished": s.finished}


def _sample_from_json(d: dict) -> data.Sample:
    from .tasks import Problem, Step

    return data.Sample(Problem(d["question"], tuple(Step(*x) for x in d["steps"])), d["text"], d["finished"])


@dataclass(frozen=True)
class BankConfig:
    """How the task family is compressed into the world's bank."""

    method: str = BuildConfig.bank_method
    rank: int = BuildConfig.bank_rank
    clusters: int = BuildConfig.bank_clusters
    dtype: str = BuildConfig.bank_dtype
    seed: int = 0

    @classmethod
    def of(cls, cfg: BuildConfig) -> BankConfig:
        return cls(cfg.bank_method, cfg.bank_rank, cfg.bank_clusters, cfg.bank_dtype, cfg.seed)


def compress_family(adapters, bank: BankConfig, progress=None):
    """The task family's `LoraAdapter`s compressed into one `Bank` (`progress`: a rich Progress)."""
    from compression.compress import CompressConfig, compress
    from compression.peft_io import Collection

    tasks: dict[str, int] = {}

    def report(phase, done, total):
        if progress is None:
            return
        if phase not in tasks:
            tasks[phase] = progress.add_task(f"bank: {phase}", total=total, loss=float("nan"))
        progress.update(tasks[phase], completed=done, total=total)

    return compress(Collection(adapters), CompressConfig(method=bank.method, rank=bank.rank,
                                                         clusters=min(bank.clusters, len(adapters)), seed=bank.seed,
                                                         dtype=bank.dtype), progress=report)


def rebank(world_dir: str | os.PathLike, bank: BankConfig, console=None, evaluate_after: bool = True) -> World:
    """Recompress a built world's task family (from its uncompressed `adapters/`) into a new bank,
    in place: the bank stage of `build` run again with other settings, without retraining. The
    old bank is replaced only once the new one is saved; the manifest records the new settings
    (and, with `evaluate_after`, a new evaluation)."""
    from compression.peft_io import load_adapter

    world = World.load(world_dir)
    if not world.has_uncompressed():
        raise ValueError(f"{world.path} has no uncompressed adapters ({world.adapters_dir}); "
                         "rebank needs a world built by `kilolora world build`")
    t0 = time.perf_counter()
    with _progress(console) as progress:
        task = progress.add_task("loading adapters", total=len(world.tasks), loss=float("nan"))
        adapters = []
        for t in world.tasks:
            adapters.append(load_adapter(world.adapters_dir / t["name"], name=t["name"]))
            progress.advance(task)
        new = compress_family(adapters, bank, progress)
    tmp = Path(tempfile.mkdtemp(prefix=".rebank.", dir=world.path))
    try:
        new.save(tmp / "bank")
        os.rename(world.bank_dir, tmp / "old")  # swap: a bank is in place at every moment but this one
        os.rename(tmp / "bank", world.bank_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    manifest = dict(world.manifest)
    manifest["build"] = {**manifest["build"], "bank_method": bank.method, "bank_rank": bank.rank,
                         "bank_clusters": bank.clusters, "bank_dtype": bank.dtype}
    manifest["build_seconds"] = {**manifest.get("build_seconds", {}), "rebank": round(time.perf_counter() - t0, 1)}
    return _update_manifest(world.path, manifest, console, evaluate_after)


RETRAINABLE = ("verifier", "self_eval")


def retrain_skills(world_dir: str | os.PathLike, names: tuple[str, ...] = RETRAINABLE, steps: int = 500,
                   batch: int = 48, console=None, evaluate_after: bool = True) -> World:
    """Retrain a built world's verifier and/or step checker in place, alone (the skills part of
    the adapter stage, with the current recipe: calculator evidence after the invocation, and
    right/wrong twins), from the base's own samples drawn exactly as `build` draws them. The old
    adapters are swapped out only once the new ones are saved; the manifest records the specs,
    the run and (with `evaluate_after`) a new evaluation."""
    from dataclasses import fields

    from serving.model import load_model
    from transformers import AutoTokenizer

    bad = [n for n in names if n not in RETRAINABLE]
    if bad or not names:
        raise ValueError(f"can retrain {list(RETRAINABLE)}, got {list(names)}")
    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be >= 1, got {steps}, {batch}")
    world = World.load(world_dir)
    known = {f.name for f in fields(BuildConfig)}
    cfg = BuildConfig(**{k: v for k, v in world.manifest["build"].items() if k in known})
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(world.base_dir))
    enc = data.Encoder(tok, cfg.variety)
    with _progress(console) as progress:
        pools = _Pools(sample_solutions(world.base_dir, cfg, progress=progress))
        model = load_model(world.base_dir)
        multi = MultiLora(model, len(names), r=cfg.r, lora_alpha=cfg.lora_alpha, seed=cfg.seed + 4)

        def sample(rng, n):
            return [pools.example(enc, rng, names[i % len(names)], i % len(names), cfg.contrast_share)
                    for i in range(n)]

        tc = TrainConfig(steps=steps, batch_size=batch, lr=cfg.adapter_lr, warmup=min(50, steps // 10),
                         seed=cfg.seed + 5)
        loss = lambda b: lora_loss(model, multi, b, tok.pad_token_id)  # noqa: E731
        losses = fit(multi_lora_step(multi, loss, lambda b: torch.tensor([e.adapter for e in b])), sample, tc,
                     f"retrain {', '.join(names)}", progress)
    specs = {s.name: s for s in SKILLS}
    tmp = Path(tempfile.mkdtemp(prefix=".retrain.", dir=world.path))
    try:
        for i, name in enumerate(names):
            inv = tok.convert_tokens_to_ids(specs[name].invocation)
            export_peft(multi, i, tmp / name, peft_config("base", cfg.r, cfg.lora_alpha, [inv]))
        for name in names:  # swap: an adapter is in place at every moment but this one
            os.rename(world.skill_dir(name), tmp / f"old-{name}")
            os.rename(tmp / name, world.skill_dir(name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    manifest = dict(world.manifest)
    manifest["build"] = {**manifest["build"], "contrast_share": cfg.contrast_share}
    manifest["skills"] = [specs[s["name"]].model_dump(exclude_defaults=True) if s["name"] in names else s
                          for s in manifest["skills"]]
    manifest["retrained"] = {"skills": list(names), "steps": steps, "batch": batch,
                             "final_loss": _tail(losses), "seconds": round(time.perf_counter() - t0, 1)}
    return _update_manifest(world.path, manifest, console, evaluate_after)


def _update_manifest(path: Path, manifest: dict, console, evaluate_after: bool) -> World:
    """Write a changed world's manifest, its old evaluation dropped, then (optionally) a new one."""
    for k in ("eval", "eval_error"):
        manifest.pop(k, None)
    _write_manifest(path, manifest)
    if evaluate_after:
        b = manifest["build"]
        _evaluate_into(manifest, World.load(path), b["eval_problems"], b["eval_per_task"], b["samples_per_problem"],
                       b["seed"], console)
        _write_manifest(path, manifest)
    return World.load(path)


def _write_manifest(path: Path, manifest: dict) -> None:
    (path / (MANIFEST + ".tmp")).write_text(json.dumps(manifest, indent=1))
    os.replace(path / (MANIFEST + ".tmp"), path / MANIFEST)


def _evaluate_into(manifest: dict, world: World, problems: int, per_task: int, samples: int, seed: int,
                   console) -> None:
    """Record an evaluation in `manifest`; a failure is recorded and warned about, never raised
    (an hour of training is not thrown away for an evaluation bug)."""
    t = time.perf_counter()
    try:
        manifest["eval"] = evaluate(world, n_problems=problems, per_task=per_task, samples=samples, seed=seed,
                                    console=console)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"the world was built but its evaluation failed: {e!r}; run `kilolora world eval`",
                      stacklevel=2)
        manifest["eval_error"] = repr(e)
    manifest.setdefault("build_seconds", {})["eval"] = round(time.perf_counter() - t, 1)

class _Pools:
    """The base model's labelled samples, as training examples of the verifier and the step checker."""

    def __init__(self, samples: list[data.Sample]):
        good = [s for s in samples if s.correct]
        gold = [] if good else [data.Sample(s.problem, s.problem.solution(), True) for s in samples[:64]]
        self.good = good or gold  # a base that never solves anything (tiny builds): reference solutions
        self.bad = [s for s in samples if not s.correct]
        steps = [(s, k, ok) for s in samples + gold for k, ok in s.step_labels()]
        self.steps_good = [x for x in steps if x[2]]
        self.steps_bad = [x for x in steps if not x[2]]

    def example(self, enc, rng: random.Random, skill: str, adapter: int, contrast_share: float):
        """A balanced example of `skill`: from the base's own samples, or (`contrast_share` of
        them) a right solution against its one-digit-wrong twin."""
        if rng.random() < contrast_share or not (self.bad and self.steps_bad):
            return data.contrast_example(enc, rng, rng.choice(self.good), skill, adapter)
        if skill == "verifier":
            return data.verifier_example(enc, rng.choice(self.good if rng.random() < 0.5 else self.bad), adapter,
                                         rng=rng)
        s, k, ok = rng.choice(self.steps_good if rng.random() < 0.5 else self.steps_bad)
        return data.self_eval_example(enc, s, k, ok, adapter, rng=rng)


class _Parts:
    """A read-only view of one column of [(skills, tasks)] losses."""

    def __init__(self, parts, i):
        self.parts, self.i = parts, i

    def __getitem__(self, sl):
        return [p[self.i] for p in self.parts[sl]]

    def __len__(self):
        return len(self.parts)


def _copy_base(src: Path, dst: Path, cfg: BuildConfig) -> None:
    """Copy a pretrained base's weights and config, checking they have this build's sizes."""
    conf = json.loads((src / "config.json").read_text())
    want = {"hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads, "intermediate_size": cfg.intermediate_size}
    bad = {k: (conf.get(k), v) for k, v in want.items() if conf.get(k) != v}
    if bad:
        raise ValueError(f"--reuse-base {src}: sizes differ from this build's (have, want): {bad}")
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy2(src / name, dst / name)


def _tail(losses: list[float], k: int = 50) -> float:
    return round(sum(losses[-k:]) / max(1, len(losses[-k:])), 4)
