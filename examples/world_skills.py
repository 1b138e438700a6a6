"""The embedded default world's skills, served by one engine: a base model solves a problem, the
tool selector proposes a calculator call, the step checker and the verifier score the work
(activated adapters: each reads the base's cached prefix and computes only its invocation and
the calculator's check of the claims it judges),
and task adapters from the compressed bank transform strings.

    python examples/world_skills.py
"""

from __future__ import annotations

from serving.sampling import SamplingParams
from skills.data import calc_checks, evidence
from skills.spec import yes_probability
from skills.tasks import Problem, Step, Transform
from skills.world import World

world = World.load()  # the embedded world: no download
engine = world.engine()
tok = engine.tokenizer
print(f"base model + {len(engine.adapters)} adapters ({len(world.tasks)} from the bank)")

problem = Problem("58*6+31", (Step(58, "*", 6), Step(348, "+", 31)))
prompt = tok.apply_chat_template([{"role": "user", "content": problem.question}], tokenize=False,
                                 add_generation_prompt=True)

# 1. the base model solves it greedily
seq = engine.open(prompt)
(done,) = engine.run([seq], SamplingParams(max_tokens=72, temperature=0.0))
print(f"base greedy:      {done.text}")


def invoke(skill_name: str, text: str) -> str:
    """What follows the context when a skill is invoked: its invocation, then (for skills that
    read one) the calculator's check of the claims in `text`."""
    skill = world.skill(skill_name)
    return skill.suffix + (evidence(calc_checks(text)) if skill.evidence == "calculator" else "")


def yes_no(context: str, skill_name: str, text: str) -> tuple[float, object]:
    """P(yes) of a yes/no skill after `context` (whose assistant part is `text`), and the counters."""
    skill = world.skill(skill_name)
    s = engine.open(context)
    suffix = invoke(skill_name, text)
    (yes, counters), (no, _) = engine.score_many([(s, suffix + skill.yes, skill.adapter),
                                                  (s, suffix + skill.no, skill.adapter)])
    engine.close(s)
    return yes_probability(yes[-1], no[-1]), counters


# 2. the verifier scores the base's solution, reusing its KV cache: only the last sampled token,
#    the invocation and the calculator's check of the solution's claims are computed
skill = world.skill("verifier")
n_context = len(tok.encode(prompt, add_special_tokens=False)) + len(done.token_ids) - 1
suffix = invoke("verifier", done.text)
(yes, c), (no, _) = engine.score_many([(seq, suffix + skill.yes, "verifier"), (seq, suffix + skill.no, "verifier")])
print(f"verifier:         P(correct) = {yes_probability(yes[-1], no[-1]):.2f} "
      f"(computed {c.prefilled} new tokens for `{suffix[len(skill.suffix):]}`; the {n_context} before them "
      f"were already in the KV cache)")
for text in (problem.solution(), problem.solution().replace("348", "358")):
    p, _ = yes_no(prompt + text + tok.eos_token, "verifier", text)
    print(f"verifier:         P(correct) = {p:.2f} for {text!r}")

# 3. the tool selector at the first step boundary
sel = world.skill("tool_selector")
close = tok.convert_tokens_to_ids("[/CALC]")
(proposal,) = engine.generate(prompt + sel.suffix, adapter=sel.adapter,
                              params=SamplingParams(max_tokens=sel.max_tokens, temperature=0.0, stop_token_ids=[close]))
print(f"tool selector:    {tok.decode(proposal.token_ids, skip_special_tokens=False)}")

# 4. the step checker on a right and a wrong first step
for step in ("58*6=348.", "58*6=358."):
    p, _ = yes_no(prompt + step, "self_eval", step)
    print(f"self-eval:        P(step ok) = {p:.2f} for {step!r}")

# 5. task adapters from the compressed bank: the prompt names the operation, the adapter knows
#    its parameter (the base alone can only guess it)
for name, inputs in (("replace-lx", ["hello", "world"]), ("add-7", ["12345", "2026"])):
    task = Transform.parse(world.skill(name).task)
    prompts = [tok.apply_chat_template([{"role": "user", "content": task.prompt(x)}], tokenize=False,
                                       add_generation_prompt=True) for x in inputs]
    print(f"{name} ({task.instruction}): want " + ", ".join(task.apply(x) for x in inputs))
    for adapter in (name, None):
        outs = engine.generate(prompts, adapter=adapter, params=SamplingParams(max_tokens=16, temperature=0.0))
        print(f"  {adapter or 'base':<15} " + ", ".join(f"{task.prompt(x)} -> {o.text}" for x, o in zip(inputs, outs)))
engine.close(seq)
