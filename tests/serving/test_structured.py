"""Structured outputs (`serving.structured`): the token masks, the engine's jobs under a grammar, and
the OpenAI server's `response_format` and vLLM's structured-output fields.

References: `json.loads` and `jsonschema.validate` (the JSON Schema reference validator; where it is
not installed, the rules of the keywords used, written in the test) of every output, `re.fullmatch` for regexes, membership for choices; for the batch, each unconstrained
sequence generated alone; for log-probabilities, the engine's own `score` of the same tokens (the
model's raw distribution, vLLM's default). Masks are checked on three tokenizer families: the
world's character tokenizer (special tokens `<|user|>`, `<|end|>`, ...), byte-level BPE and
SentencePiece with byte fallback (`tests/serving/test_engine_text.py`).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Annotated, Literal

import pytest
import torch
from pydantic import BaseModel, Field

import serving.scheduler
from serving import Engine, SamplingParams
from serving.sampling import sample
from serving.structured import MAX_SPEC_BYTES, Grammars, StructuredOutputError, StructuredOutputsParams, mask_logits
from tests.serving.server_helpers import WORLD, assert_error, sse
from tests.serving.test_engine_text import _byte_level, _sentencepiece

SCHEMA = {  # nested objects, an enum, arrays (of strings, of objects), numbers, a boolean
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": -10, "maximum": 10},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "points": {"type": "array", "minItems": 1, "maxItems": 2,
                   "items": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}},
                             "required": ["x"], "additionalProperties": False}},
        "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                    "properties": {"city": {"type": "string", "maxLength": 10},
                                   "zip": {"type": "integer", "minimum": 10000, "maximum": 99999}}},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "score", "role", "tags", "points", "address", "active"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{1,6}@[a-z]{2,5}\.(com|org)"
CHOICES = ["yes", "no", "maybe so", 'say "hi"']
PROMPT = "<|user|>Describe a user as JSON.<|assistant|>"


def _check(doc, schema: dict, at: str = "$") -> None:
    """JSON Schema's rules for the keywords these tests use (the reference, `jsonschema`, when absent)."""
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int, "number": (int, float)}
    t = schema.get("type")
    assert t is None or isinstance(doc, types[t]) and not (t in ("integer", "number") and isinstance(doc, bool)), at
    assert "enum" not in schema or doc in schema["enum"], at
    if isinstance(doc, str):
        assert schema.get("minLength", 0) <= len(doc) <= schema.get("maxLength", len(doc)), at
    if isinstance(doc, (int, float)) and not isinstance(doc, bool):
        assert schema.get("minimum", doc) <= doc <= schema.get("maximum", doc), at
    if isinstance(doc, list):
        assert schema.get("minItems", 0) <= len(doc) <= schema.get("maxItems", len(doc)), at
        for i, x in enumerate(doc):
            _check(x, schema.get("items", {}), f"{at}[{i}]")
    if isinstance(doc, dict):
        props = schema.get("properties", {})
        assert set(schema.get("required", [])) <= set(doc), at
        assert schema.get("additionalProperties", True) is not False or set(doc) <= set(props), at
        for k, v in doc.items():
            _check(v, props.get(k, {}), f"{at}.{k}")


def _valid(text: str) -> None:
    doc = json.loads(text)
    _check(doc, SCHEMA)
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.validate(doc, SCHEMA)


def _matches(text: str) -> None:
    assert re.fullmatch(REGEX, text), text


def _chosen(text: str) -> None:
    assert text in CHOICES, text


CHECK = {"json": _valid, "regex": _matches, "choice": _chosen}


# ----------------------------------------------------------------------------------- the spec
def test_a_spec_is_exactly_one_thing_and_bounded():
    assert StructuredOutputsParams(json=SCHEMA).kind == "json"
    assert StructuredOutputsParams(json=json.dumps(SCHEMA)).key == StructuredOutputsParams(json=SCHEMA).key

    class Point(BaseModel):
        x: int

    assert json.loads(StructuredOutputsParams(json=Point).json) == Point.model_json_schema()
    assert StructuredOutputsParams(choice=["a", "b"]).choice == ("a", "b")
    for kw, match in [({}, "exactly one"), (dict(json=SCHEMA, regex="a"), "exactly one"),
                      (dict(json="{nope"), "not valid JSON"), (dict(json="[1]"), "an object"),
                      (dict(choice="ab"), "list of strings"), (dict(choice=[]), "1 to"), (dict(regex=""), "non-empty"),
                      (dict(json_object="yes"), "True or False"),
                      (dict(regex="a" * (MAX_SPEC_BYTES + 1)), f"at most {MAX_SPEC_BYTES}")]:
        with pytest.raises(ValueError, match=match):
            StructuredOutputsParams(**kw)
    with pytest.raises(ValueError, match="min_tokens"):  # its EOS mask could leave a finished grammar nothing
        SamplingParams(min_tokens=2, structured_outputs=StructuredOutputsParams(regex="a+"))
    assert SamplingParams(structured_outputs={"regex": "a+"}).structured_outputs.regex == "a+"


# ------------------------------------------------------------------ masks on three tokenizers
@pytest.fixture(scope="module", params=["world", "byte-level", "sentencepiece"])
def tok(request):
    return {"world": WORLD.tokenizer, "byte-level": _byte_level, "sentencepiece": _sentencepiece}[request.param]()


def _special(tok) -> set[int]:
    return set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}


def sampled(tok, spec: StructuredOutputsParams, n: int = 200, steps: int = 400, seed: int = 0,
            open_ok: bool = False) -> list[str]:
    """n completions sampled at temperature 1 from random logits under `spec`'s masks (the scheduler's
    `mask_logits` + `sample`), stepped together; each must end with EOS, which its grammar accepts
    (`open_ok`: those still open after `steps` are left out)."""
    vocab, eos = len(tok), tok.eos_token_id
    grammars = Grammars(tok, vocab, {eos})
    ms = [grammars.matcher(spec) for _ in range(n)]
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    g = torch.Generator().manual_seed(seed)
    out: list[list[int]] = [[] for _ in range(n)]
    live = list(range(n))
    p = SamplingParams(temperature=1.0, max_tokens=steps)
    for _ in range(steps):
        if not live:
            break
        logits = torch.randn(len(live), vocab, generator=g) * 3  # (B, V)
        x = mask_logits(logits, list(range(len(live))), [ms[i] for i in live])
        assert torch.equal(torch.isinf(x).sum(-1) < vocab, torch.ones(len(live), dtype=torch.bool))
        toks = sample(x, [p] * len(live), [gens[i] for i in live]).tolist()
        still = []
        for i, t in zip(live, toks):
            ms[i].accept(t)
            if t == eos:
                assert ms[i].done
            else:
                assert not ms[i].done
                out[i].append(t)
                still.append(i)
        live = still
    assert open_ok or not live, f"{len(live)} completions were still open after {steps} tokens"
    special = _special(tok)
    assert not any(t in special for o in out for t in o), "a special token inside a structured output"
    return [tok.decode(o) for i, o in enumerate(out) if i not in live]


def test_200_sampled_completions_under_a_json_schema_validate(tok):
    texts = sampled(tok, StructuredOutputsParams(json=SCHEMA))
    for t in texts:
        _valid(t)
    assert len(set(texts)) > 150  # sampled, not one answer 200 times
    roles = {json.loads(t)["role"] for t in texts}
    assert roles == {"admin", "user", "guest"}


def test_200_sampled_completions_under_a_regex_a_choice_and_json_object(tok):
    for t in sampled(tok, StructuredOutputsParams(regex=REGEX), seed=1):
        assert re.fullmatch(REGEX, t), t
    got = sampled(tok, StructuredOutputsParams(choice=CHOICES), seed=2)
    assert set(got) <= set(CHOICES) and len(set(got)) >= 3
    if tok.decode(tok.encode("é🙂", add_special_tokens=False)) == "é🙂":  # not the world's: it has no 'é'
        wide = ["café 🙂", "naïve\tx", "数学"]
        assert set(sampled(tok, StructuredOutputsParams(choice=wide), n=60, seed=4)) == set(wide)
    objects = sampled(tok, StructuredOutputsParams(json_object=True), n=50, seed=3, open_ok=True)  # unbounded
    assert len(objects) >= 25
    for t in objects:
        assert isinstance(json.loads(t), dict), t


def test_only_eos_once_the_grammar_is_complete_and_no_special_token_ever(tok):
    grammars = Grammars(tok, len(tok), {tok.eos_token_id})
    m = grammars.matcher(StructuredOutputsParams(choice=["yes"]))
    for t in tok.convert_tokens_to_ids(list("yes")):  # one token a character (SentencePiece would prepend ▁)
        x = mask_logits(torch.zeros(1, len(tok)), [0], [m])[0]
        assert not (set(torch.isfinite(x).nonzero()[:, 0].tolist()) & _special(tok))
        m.accept(t)
    x = mask_logits(torch.zeros(1, len(tok)), [0], [m])[0]
    assert torch.isfinite(x).nonzero()[:, 0].tolist() == [tok.eos_token_id]
    with pytest.raises(StructuredOutputError, match="not allowed"):
        grammars.matcher(StructuredOutputsParams(choice=["yes"])).accept(tok.convert_tokens_to_ids("n"))


def _accepts(grammars, spec, text: str, tok) -> bool:
    m = grammars.matcher(spec)
    try:
        for t in tok.encode(text, add_special_tokens=False):
            m.accept(t)
        m.accept(tok.eos_token_id)
    except StructuredOutputError:
        return False
    return m.done


def test_strings_hold_only_what_json_allows():
    """xgrammar 0.2.9 lets control characters into strings with minLength/maxLength (invalid JSON), and
    UTF-16 surrogates (invalid UTF-8) into every string; `structured._json_grammar` refuses both."""
    tok = _byte_level()  # every byte has a token
    grammars = Grammars(tok, len(tok), {tok.eos_token_id})
    for schema in [{"type": "string", "maxLength": 4}, {"type": "string", "minLength": 1}, {"type": "string"}]:
        spec = StructuredOutputsParams(json=schema)
        assert _accepts(grammars, spec, '"ab"', tok) and _accepts(grammars, spec, '"é🙂"', tok)
        for bad in ['"a\x01"', '"a\tb"', '"a\nb"', '"\ud8b2"']:  # the last: U+D8B2 written as UTF-8 bytes
            assert not _accepts_bytes(grammars, spec, bad.encode("utf-8", "surrogatepass"), tok), (schema, bad)
    assert not _accepts(grammars, StructuredOutputsParams(json={"type": "string", "maxLength": 4}), '"abcde"', tok)
    assert _accepts(grammars, StructuredOutputsParams(json={"type": "string"}), r'"a\"b\u00e9"', tok)  # escapes


def _accepts_bytes(grammars, spec, data: bytes, tok) -> bool:
    """Whether the grammar takes `data` fed one byte-level token per byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_char = bytes_to_unicode()
    m = grammars.matcher(spec)
    try:
        for b in data:
            m.accept(tok.convert_tokens_to_ids(to_char[b]))
        m.accept(tok.eos_token_id)
    except StructuredOutputError:
        return False
    return m.done


def test_the_torch_path_masks_as_xgrammar_does():
    """Logits off the CPU (or in a dtype xgrammar's CPU kernel lacks) are masked by unpacking the bits
    in torch: float64 takes that path here."""
    tok = WORLD.tokenizer()
    grammars = Grammars(tok, len(tok), {tok.eos_token_id})
    ms = [grammars.matcher(StructuredOutputsParams(json=SCHEMA)) for _ in range(3)]
    for t in tok.encode('{"name": "', add_special_tokens=False):
        ms[1].accept(t)
    logits = torch.randn(5, len(tok))
    a = mask_logits(logits, [0, 2, 4], ms)
    b = mask_logits(logits.double(), [0, 2, 4], ms)
    assert torch.equal(a.double(), b)
    assert torch.equal(a[[1, 3]], logits[[1, 3]])  # rows without a grammar are untouched
    assert not torch.equal(a[2], a[0])  # inside a string, not at the start of the object


def test_compiled_once_per_spec_lru_bounded_and_refused_clearly():
    tok = WORLD.tokenizer()
    grammars = Grammars(tok, len(tok), {tok.eos_token_id}, max_cached=2)
    a = StructuredOutputsParams(json=SCHEMA)
    first = grammars.compile(a)
    assert grammars.compile(StructuredOutputsParams(json=json.dumps(SCHEMA))) is first
    grammars.compile(StructuredOutputsParams(regex="a+"))
    grammars.compile(StructuredOutputsParams(choice=["x"]))
    assert len(grammars) == 2 and grammars.compile(a) is not first  # evicted, compiled anew
    for spec, match in [(StructuredOutputsParams(json={"type": "strin"}),
                         "JSON schema does not compile: Unsupported type"),
                        (StructuredOutputsParams(regex="(unclosed"), "regex does not compile"),
                        (StructuredOutputsParams(grammar="rot ::= \"a\""), "grammar does not compile")]:
        with pytest.raises(StructuredOutputError, match=match) as e:
            grammars.compile(spec)
        assert ".cc:" not in str(e.value)  # xgrammar's C++ location is not the user's business
    slow = Grammars(tok, len(tok), {tok.eos_token_id}, compile_timeout_s=1e-6)
    with pytest.raises(StructuredOutputError, match="did not compile within"):
        slow.compile(a)
    assert len(slow) == 0


# --------------------------------------------------------------------- the engine on the world
@pytest.fixture(scope="module")
def world():
    return WORLD.engine(bank=False, kv_cache_tokens=200 * 320)


def test_200_world_model_completions_at_temperature_1_validate(world):
    params = SamplingParams(max_tokens=300, temperature=1.0, seed=0, structured_outputs={"json": SCHEMA})
    out = world.generate([PROMPT] * 200, params=params)
    for c in out:
        assert c.finish_reason == "stop" and c.token_ids[-1] in world.eos_token_ids, c
        _valid(c.text)
    assert len({c.text for c in out}) > 150


def test_greedy_regex_and_choice_on_the_world_model(world):
    ids = world.tokenizer.encode(PROMPT, add_special_tokens=False)
    for spec in [dict(json=SCHEMA), dict(regex=REGEX), dict(choice=CHOICES)]:
        for temperature in (0.0, 1.0):
            params = SamplingParams(max_tokens=300, temperature=temperature, seed=3, structured_outputs=spec)
            out = world.generate([ids] * 8, params=params)
            for c in out:
                assert c.finish_reason == "stop", c
                CHECK[next(iter(spec))](c.text)


@pytest.mark.parametrize("held_logprobs", [2, None])  # the masks go on a copy of the logits / on them in place
def test_a_mixed_batch_leaves_the_unconstrained_as_they_are_alone_and_logprobs_raw(world, held_logprobs):
    prompts = [PROMPT, "<|user|>12*3+4<|assistant|>", "<|user|>hello<|assistant|>", "<|user|>7*8<|assistant|>"]
    free = [SamplingParams(max_tokens=24, temperature=t, seed=11, logprobs=2) for t in (0.0, 1.0)]
    held = SamplingParams(max_tokens=300, temperature=1.0, seed=5, logprobs=held_logprobs,
                          structured_outputs={"json": SCHEMA})
    seqs = [world.open(p) for p in prompts]
    try:
        got = world.run(seqs, [free[0], held, free[1], held])
    finally:
        for s in seqs:
            world.close(s)
    for i in (0, 2):  # `run` seeds the i-th sequence with seed + i
        [alone] = world.generate([prompts[i]], params=replace(free[i // 2], seed=free[i // 2].seed + i))
        assert got[i].token_ids == alone.token_ids and got[i].text == alone.text
        torch.testing.assert_close(torch.tensor([t.logprob for t in got[i].logprobs]),
                                   torch.tensor([t.logprob for t in alone.logprobs]), atol=1e-5, rtol=1e-5)
    for i in (1, 3):
        _valid(got[i].text)
        if held_logprobs is None:
            continue
        ctx = world.open(prompts[i])
        try:
            raw = world.score(ctx, got[i].token_ids)  # the model's own distribution, no mask
        finally:
            world.close(ctx)
        torch.testing.assert_close(torch.tensor([t.logprob for t in got[i].logprobs]), torch.tensor(raw),
                                   atol=1e-4, rtol=1e-4)
        # the forced `{`, then `"name": "`: log p < 0 under the model (0 if they were renormalized under the mask)
        assert all(t.logprob < -1e-3 for t in got[i].logprobs[:3])


def test_the_grammar_end_ends_the_job_even_under_ignore_eos(world):
    params = SamplingParams(max_tokens=50, temperature=1.0, seed=1, ignore_eos=True,
                            structured_outputs={"choice": ["yes", "no"]})
    for c in world.generate([PROMPT] * 4, params=params):
        assert c.finish_reason == "stop" and c.text in ("yes", "no") and c.token_ids[-1] in world.eos_token_ids


def test_a_batch_without_structured_outputs_does_no_grammar_work(world, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("mask_logits ran for a batch with no grammar")

    monkeypatch.setattr(serving.scheduler, "mask_logits", boom)
    out = world.generate([PROMPT] * 4, params=SamplingParams(max_tokens=8, temperature=1.0, seed=0))
    assert all(c.finish_reason != "error" for c in out)


def test_what_cannot_be_served_is_refused_or_fails_alone(world, tiny_llama_dir):
    with pytest.raises(StructuredOutputError, match="does not compile"):
        world.generate(PROMPT, params=SamplingParams(structured_outputs={"regex": "(unclosed"}))
    no_tok = Engine.from_pretrained(tiny_llama_dir, kv_cache_tokens=256)  # no tokenizer there
    s = no_tok.open([5, 6, 7])
    with pytest.raises(ValueError, match="need a tokenizer"):
        no_tok.submit(s, SamplingParams(structured_outputs={"regex": "a"}))
    # 'é' is outside the world's vocabulary: that job fails with a reason, its batch-mates finish
    plain = SamplingParams(max_tokens=6, temperature=0)
    bad = SamplingParams(max_tokens=6, structured_outputs={"choice": ["caf\u00e9!"]})
    seqs = [world.open(PROMPT) for _ in range(3)]
    try:
        got = world.run(seqs, [plain, bad, plain])
    finally:
        for q in seqs:
            world.close(q)
    assert got[1].finish_reason == "error" and "allows no token" in got[1].error
    alone = world.generate(PROMPT, params=plain)[0]
    for c in (got[0], got[2]):
        assert c.finish_reason == alone.finish_reason and c.token_ids == alone.token_ids


def test_fork_and_rewind_wait_for_a_structured_job(world):
    s = world.open(PROMPT)
    try:
        world.submit(s, SamplingParams(max_tokens=200, structured_outputs={"json": SCHEMA}))
        for op in (lambda: world.fork(s), lambda: world.rewind(s, 3)):
            with pytest.raises(RuntimeError, match="while a job runs"):
                op()
        [c] = world.wait([s])
        _valid(c.text)
        # a new job on the (rewound) sequence starts its own grammar at its own first token
        world.rewind(s, len(world.tokenizer.encode(PROMPT, add_special_tokens=False)))
        [again] = world.run([s], SamplingParams(max_tokens=20, structured_outputs={"regex": REGEX}))
        assert re.fullmatch(REGEX, again.text)
    finally:
        world.close(s)


# ------------------------------------------------------------------------------------- over HTTP
class Address(BaseModel):
    city: str = Field(max_length=10)
    zip: int = Field(ge=10000, le=99999)


class User(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    role: Literal["admin", "user", "guest"]
    tags: list[Annotated[str, Field(max_length=6)]] = Field(max_length=3)  # the world model, greedy, may never
    # close an unbounded string
    address: Address
    active: bool


def test_the_openai_sdk_parses_a_pydantic_model(client):
    for temperature in (0.0, 1.0):
        r = client.chat.completions.parse(model="base", messages=[{"role": "user", "content": "A user as JSON"}],
                                          response_format=User, temperature=temperature, seed=4, max_tokens=300, n=2)
        for ch in r.choices:
            assert ch.finish_reason == "stop"
            assert isinstance(ch.message.parsed, User)
            assert User.model_validate_json(ch.message.content) == ch.message.parsed


def test_response_format_json_schema_and_json_object(client, http):
    msgs = [{"role": "user", "content": "A user as JSON"}]
    r = client.chat.completions.create(model="base", messages=msgs, temperature=1.0, seed=2, max_tokens=300,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "user", "schema": SCHEMA,
                                                                        "strict": True}})
    _valid(r.choices[0].message.content)
    r = client.chat.completions.create(model="base", messages=msgs, temperature=1.0, seed=2, max_tokens=300,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    body = {"model": "base", "messages": msgs, "temperature": 1.0, "seed": 3, "max_tokens": 300, "stream": True,
            "response_format": {"type": "json_schema", "json_schema": {"name": "user", "schema": SCHEMA}}}
    with http.stream("POST", "/v1/chat/completions", json=body) as s:
        assert s.status_code == 200
        events = sse(s.iter_lines())
    _valid("".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]))


def test_vllm_structured_output_fields_on_both_endpoints(client):
    prompt = WORLD.tokenizer().apply_chat_template([{"role": "user", "content": "pick"}], tokenize=False,
                                                   add_generation_prompt=True)
    def parens(text):
        assert re.fullmatch(r"\(\d\)", text), text

    for extra, check in [({"guided_choice": CHOICES}, _chosen), ({"guided_regex": REGEX}, _matches),
                         ({"guided_json": SCHEMA}, _valid), ({"structured_outputs": {"regex": REGEX}}, _matches),
                         ({"structured_outputs": {"choice": CHOICES}}, _chosen),
                         ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}}, _valid),
                         ({"guided_grammar": 'root ::= "(" [0-9] ")"'}, parens)]:
        r = client.completions.create(model="base", prompt=prompt, max_tokens=300, temperature=1.0, seed=1, n=2,
                                      extra_body=extra)
        for ch in r.choices:
            assert ch.finish_reason == "stop", (extra, ch)
            check(ch.text)
        if "guided_json" in extra or "guided_choice" in extra:  # chat takes them too (greedy here)
            c = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "pick"}],
                                               max_tokens=300, temperature=0, extra_body=extra)
            check(c.choices[0].message.content)


def test_specs_that_cannot_be_served_are_a_400_naming_their_field(http):
    base = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    for extra, param, code in [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
         "response_format", "invalid_value"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format",
         "invalid_value"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "enum": ["v" * 1000] * 70}}}}, "response_format", "invalid_value"),  # over 64 KiB
        ({"guided_regex": "(unclosed"}, "guided_regex", "invalid_value"),
        ({"guided_grammar": "rot ::= \"a\""}, "guided_grammar", "invalid_value"),
        ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag", "unsupported_value"),
        ({"structured_outputs": {"json": {}, "whitespace_pattern": " *"}}, "structured_outputs.whitespace_pattern",
         "unsupported_value"),
        ({"structured_outputs": {"json": SCHEMA, "regex": "a"}}, "structured_outputs", "invalid_value"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, None, "invalid_value"),
        ({"response_format": {"type": "json_object"}, "min_tokens": 3}, "min_tokens", None),
        ({"response_format": {"type": "json_object"}, "tool_choice": "auto",
          "tools": [{"type": "function", "function": {"name": "calculator", "parameters": {
              "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]},
         "response_format", "unsupported_value"),
    ]:
        err = assert_error(http.post("/v1/chat/completions", json={**base, **extra}), 400, code, param)
        if param is not None:
            assert param.split(".")[0] in err["message"], err
    r = http.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 4,
                                           "guided_json": {"type": "strin"}})
    assert_error(r, 400, "invalid_value", "guided_json")


def test_langchain_with_structured_output(server):
    lc = pytest.importorskip("langchain_openai")
    llm = lc.ChatOpenAI(model="base", base_url=server + "/v1", api_key="unused", temperature=0, max_tokens=300,
                        max_retries=0)
    got = llm.with_structured_output(User).invoke("A user as JSON")
    assert isinstance(got, User)
    raw = llm.with_structured_output(User, include_raw=True).invoke("Another user")
    assert raw["parsing_error"] is None and isinstance(raw["parsed"], User)
    assert raw["parsed"] == User.model_validate_json(raw["raw"].content)


def test_the_responses_api_text_format(client):
    r = client.responses.create(model="base", input="A user as JSON", temperature=1.0, max_output_tokens=300,
                                text={"format": {"type": "json_schema", "name": "user", "schema": SCHEMA}})
    _valid(r.output_text)
    parsed = client.responses.parse(model="base", input="A user", temperature=0, max_output_tokens=300,
                                    text_format=User)
    assert isinstance(parsed.output_parsed, User)
