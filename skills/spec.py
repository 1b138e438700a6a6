"""Skill specs: what an adapter is for, how it is invoked and how its output is read.

A skill is a LoRA adapter with a role. Activated skills (aLoRA) are invoked by appending their
invocation token to the context; the engine applies them from there on, over the base model's
cached prefix. A skill may also read evidence placed after its invocation (a tool's check of the
text it judges): the adapter computes those tokens itself, which is what lets it compare them
with the context (the base's representations of the context were never trained to). Reading a `yes_no` skill is one scoring call: score = P(yes) / (P(yes) + P(no))
at the position right after the invocation. A `text` skill generates until one of its stops.
Specs are pydantic models because they are read from `world.json` files users may write.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .tokenizer import NO, YES

Role = Literal["verifier", "tool_selector", "self_eval", "task"]


class Skill(BaseModel):
    """One skill of a world."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    role: Role
    adapter: str = Field(min_length=1)
    """adapter name the engine serves it under (a PEFT directory or a bank entry)"""
    activation: Literal["standard", "activated"] = "standard"
    invocation: str | None = None
    """the activated skill's invocation string, e.g. `<|verify|>`"""
    prompt: str = "{context}"
    """how the skill's input is laid out; `{context}` is the conversation so far"""
    output: Literal["yes_no", "text"] = "text"
    yes: str = YES
    no: str = NO
    stop: list[str] = Field(default_factory=list)
    """text skills: stop strings"""
    evidence: Literal["calculator"] | None = None
    """what the caller computes and appends after the invocation, for the adapter to read:
    `calculator` = the calculator's verdict on every arithmetic claim `a op b = c` of the
    assistant's text (`data.evidence`): `xv` = the first claim is wrong, the second right"""
    max_tokens: int = Field(default=32, ge=1, le=4096)
    description: str = ""
    task: str | None = None
    """task skills: the task this adapter performs (e.g. `shift 3`)"""

    @model_validator(mode="after")
    def _check(self) -> Skill:
        if self.activation == "activated" and not self.invocation:
            raise ValueError(f"skill {self.name!r}: an activated skill needs its invocation string")
        if self.activation == "standard" and self.invocation:
            raise ValueError(f"skill {self.name!r}: a standard skill has no invocation (got {self.invocation!r})")
        if "{context}" not in self.prompt:
            raise ValueError(f"skill {self.name!r}: prompt must contain {{context}}, got {self.prompt!r}")
        if self.invocation and not self.prompt.endswith(self.invocation):
            raise ValueError(f"skill {self.name!r}: an activated skill's prompt must end with its invocation")
        if self.evidence and self.activation != "activated":
            raise ValueError(f"skill {self.name!r}: evidence goes after an invocation; only activated skills take it")
        return self

    def render(self, context: str) -> str:
        return self.prompt.replace("{context}", context)

    @property
    def suffix(self) -> str:
        """What the skill appends after the context (the invocation for activated skills)."""
        return self.prompt.split("{context}", 1)[1]


def yes_probability(logprob_yes: float, logprob_no: float) -> float:
    """P(yes) renormalised over {yes, no}; a log-probability of -inf (an answer missing from a
    top-logprobs list) counts as probability 0, and 0.5 when both are."""
    import math

    if logprob_yes == logprob_no == -math.inf:
        return 0.5
    m = max(logprob_yes, logprob_no)
    py, pn = math.exp(logprob_yes - m), math.exp(logprob_no - m)
    return py / (py + pn)
