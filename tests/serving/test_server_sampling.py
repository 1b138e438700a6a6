"""vLLM's sampling extras over HTTP (`repetition_penalty`, `presence_penalty` /
`frequency_penalty`, `min_p`, `min_tokens`, `stop_token_ids`, `skip_special_tokens`): the server
gives what the in-process engine gives with the same `SamplingParams` (the sampler itself is
checked against a reference in test_sampling_extras.py), and refuses values out of range."""

from __future__ import annotations

import pytest

from serving.sampling import SamplingParams
from tests.serving.server_helpers import TASK, assert_error, render

EXTRAS = [
    {"repetition_penalty": 1.8},
    {"presence_penalty": 1.5, "frequency_penalty": 0.7},
    {"min_p": 0.3, "temperature": 1.0, "seed": 7},
    {"repetition_penalty": 0.6, "frequency_penalty": -0.5, "min_p": 0.05, "temperature": 0.8, "seed": 3},
]


@pytest.mark.parametrize("extra", EXTRAS, ids=lambda e: "+".join(e))
def test_sampling_extras_equal_the_engine(client, engine, tok, extra):
    prompt = render(tok, TASK[1])
    kw = {"temperature": 0.0, **extra}
    [want] = engine.generate(prompt, TASK[0], SamplingParams(max_tokens=32, **kw))
    [plain] = engine.generate(prompt, TASK[0], SamplingParams(max_tokens=32, temperature=kw["temperature"],
                                                               seed=kw.get("seed")))
    got = client.completions.create(model=TASK[0], prompt=prompt, max_tokens=32, temperature=kw.pop("temperature"),
                                    seed=kw.pop("seed", None), presence_penalty=kw.pop("presence_penalty", None),
                                    frequency_penalty=kw.pop("frequency_penalty", None), extra_body=kw)
    assert got.choices[0].text == want.text
    if extra == EXTRAS[0]:
        assert want.text != plain.text  # the penalty changed the answer: the field was not dropped


def test_min_tokens_and_stop_token_ids(client, engine, tok):
    prompt = render(tok, TASK[1])
    end = tok.convert_tokens_to_ids("<|end|>")
    [alone] = engine.generate(prompt, TASK[0], SamplingParams(max_tokens=64, temperature=0.0))
    n = len(alone.token_ids)  # ends at <|end|> (EOS)
    longer = client.completions.create(model=TASK[0], prompt=prompt, max_tokens=n + 8, temperature=0.0,
                                       extra_body={"min_tokens": n + 4}).choices[0]
    [want] = engine.generate(prompt, TASK[0], SamplingParams(max_tokens=n + 8, temperature=0.0, min_tokens=n + 4))
    assert longer.text == want.text and len(want.token_ids) >= n + 4
    # the first letter of the answer as a stop token: the choice stops there, and says which id stopped it
    first = alone.token_ids[0]
    stopped = client.completions.create(model=TASK[0], prompt=prompt, max_tokens=16, temperature=0.0,
                                        extra_body={"stop_token_ids": [first, end]}).choices[0]
    assert stopped.finish_reason == "stop" and stopped.model_extra["stop_reason"] == first and stopped.text == ""
    kept = client.completions.create(model=TASK[0], prompt=prompt, max_tokens=64, temperature=0.0, extra_body={
        "skip_special_tokens": False, "ignore_eos": True, "max_tokens": n + 2}).choices[0]
    assert "<|end|>" in kept.text


@pytest.mark.parametrize("field,value", [("repetition_penalty", 0), ("repetition_penalty", -1), ("min_p", 1.5),
                                         ("presence_penalty", 2.5), ("frequency_penalty", -3), ("min_tokens", -1),
                                         ("stop_token_ids", [-1]), ("stop_token_ids", [10**6]),
                                         ("skip_special_tokens", "no")])
def test_sampling_extras_out_of_range_are_refused(http, field, value):
    body = {"model": TASK[0], "prompt": "shift: abc", "max_tokens": 4, field: value}
    assert_error(http.post("/v1/completions", json=body), 400, param=field)
