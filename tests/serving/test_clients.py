"""The clients people already use, unchanged, against `kilolora serve` (the suite-wide subprocess on
the embedded world; see server_helpers.py): a LangGraph ReAct agent on LangChain's `ChatOpenAI`,
lm-evaluation-harness's `local-completions` model on local tasks, and litellm's `completion` and
`responses` with an `openai/` model and `api_base`. Each is driven as its users drive it; nothing
in the clients is patched.

References: greedy text from the in-process engine of the same world (`reference`), with the tool
call the world's tool selector proposes and the answer it continues with after the tool's result;
log-likelihoods from the engine's own scores of the same tokens (`Engine.score_many`), to 1e-4 as in
test_server_scoring.py; accuracies recomputed from those scores; arithmetic from Python. The
agent's tool declares its one parameter as `formula` (the world's calculator calls it
`expression`): the server binds the world's markup call to the tool the client declared.
"""

from __future__ import annotations

import json
import random

import pytest

from orchestrator.tools import calculate
from orchestrator.world import world_tool_format
from serving import SamplingParams
from serving.openai.boundary import IGNORED_HEADER
from skills.tasks import Transform, corrupt, parse_answer
from tests.serving.server_helpers import PROBLEM, WORLD, n_tokens, reference, render

PRODUCT, ADDEND = PROBLEM.split("+")
ANSWER = int(PRODUCT.split("*")[0]) * int(PRODUCT.split("*")[1]) + int(ADDEND)
ATOL = 1e-4  # per summed log-likelihood: see test_server_scoring.py for the measured error
FORMULA = {"type": "object", "properties": {"formula": {"type": "string"}}, "required": ["formula"]}
CALC = {"type": "function", "function": {"name": "calc", "description": "evaluate an arithmetic formula",
                                         "parameters": FORMULA}}


@pytest.fixture(scope="module")
def solved(engine, tok):
    """The world's own answer to PROBLEM with its calculator, in process: (the argument the tool
    selector proposes at the start of the turn, the result, the greedy continuation after it)."""
    fmt = world_tool_format(WORLD)
    prompt = render(tok, PROBLEM)
    proposed = reference(engine, prompt + fmt.invocation, fmt.proposer, fmt.max_call_tokens, stop=[fmt.close])
    arg = json.loads(fmt.parse(proposed.text).arguments)[fmt.argument]
    result = str(calculate(arg))
    after = reference(engine, prompt + f"{fmt.open}{arg}{fmt.close}{fmt.result_prefix}{result}{fmt.result_suffix}",
                      None, 48)
    assert arg == PRODUCT and parse_answer(after.text) == ANSWER  # the world solves it with the tool...
    plain = reference(engine, prompt, None, 48).text
    assert parse_answer(plain) != ANSWER  # ...and not without it: the call is what makes the answer right
    return arg, result, after.text, plain


# --------------------------------------------------------------------------- LangGraph
@pytest.mark.filterwarnings("ignore:create_react_agent has been moved")
def test_a_langgraph_react_agent_calls_the_declared_tool(server, client, solved):
    from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from langgraph.prebuilt import create_react_agent  # langgraph 1.x; langchain.agents.create_agent is its heir

    arg, result, after, plain = solved
    calls = []

    @tool
    def calc(formula: str) -> str:
        """Evaluate an arithmetic formula."""
        calls.append(formula)
        return str(calculate(formula))

    llm = ChatOpenAI(base_url=server + "/v1", api_key="unused", model="base", temperature=0, max_tokens=48,
                     max_retries=0, include_response_headers=True)
    assert llm.invoke(PROBLEM).content == plain  # the model alone, through LangChain
    agent = create_react_agent(llm, [calc])
    messages = agent.invoke({"messages": [("user", PROBLEM)]})["messages"]
    assert [type(m) for m in messages] == [HumanMessage, AIMessage, ToolMessage, AIMessage]
    _, asked, answered, final = messages
    [call] = asked.tool_calls
    assert (call["name"], call["args"]) == ("calc", {"formula": arg}) and calls == [arg]
    assert (answered.content, answered.tool_call_id, answered.name) == (result, call["id"], "calc")
    assert final.content == after and not final.tool_calls and parse_answer(final.content) == ANSWER
    assert [IGNORED_HEADER in m.response_metadata["headers"] for m in (asked, final)] == [False, False]
    # The same turn through the openai client: the same call, under the same declared tool.
    direct = client.chat.completions.create(model="base", messages=[{"role": "user", "content": PROBLEM}],
                                            tools=[CALC], temperature=0, max_tokens=48).choices[0]
    [d] = direct.message.tool_calls
    assert (d.function.name, json.loads(d.function.arguments)) == ("calc", {"formula": arg})

    # Streamed (LangGraph's "messages" mode streams the model's tokens): the same run, chunk by chunk.
    chunks = [m for m, _ in agent.stream({"messages": [("user", PROBLEM)]}, stream_mode="messages")
              if isinstance(m, AIMessageChunk)]
    assert len(chunks) > 2
    call_chunks = [c for m in chunks for c in m.tool_call_chunks]
    assert "".join(c["name"] or "" for c in call_chunks) == "calc"
    assert json.loads("".join(c["args"] or "" for c in call_chunks)) == {"formula": arg}
    assert "".join(m.content for m in chunks) == after and calls == [arg, arg]


# --------------------------------------------------------------------------- lm-evaluation-harness
TASK = Transform("replace", "l x")  # the task adapter `replace-lx` answers `replace: x`; the base does not
END = "<|end|>"


def _docs(tok) -> list[dict]:
    """Held-out inputs of the replace-lx task: the chat prompt, the answer, and four choices (the
    answer, the input with `l` replaced by a neighbouring letter, and a one-letter near miss) with
    the answer's index."""
    out = []
    for i, x in enumerate(TASK.inputs(6, seed=11, split="test")):
        answer = TASK.apply(x)
        assert answer != x  # every input has an `l`: the choices differ
        choices = [answer, Transform("replace", "l w").apply(x), Transform("replace", "l y").apply(x),
                   corrupt(answer, "abcdefghijklmnopqrstuvwxyz", random.Random(i))]
        random.Random(i).shuffle(choices)
        out.append({"prompt": render(tok, TASK.prompt(x)), "answer": answer, "text": f"{x} {answer}",
                    "choices": [c + END for c in choices], "gold": choices.index(answer)})
    return out


def _task(name: str, data, output_type: str, **kw) -> dict:
    return {"task": name, "dataset_path": "json", "test_split": "test", "output_type": output_type,
            "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(data.parent / "cache")}, **kw}


TASKS = {  # a generation task (exact match), a multiple-choice one (log-likelihoods), a perplexity one
    "kl_task_gen": dict(output_type="generate_until", doc_to_text="{{prompt}}", doc_to_target="{{answer}}",
                         target_delimiter="", generation_kwargs={"until": [END], "max_gen_toks": 16, "temperature": 0},
                         metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]),
    "kl_task_mc": dict(output_type="multiple_choice", doc_to_text="{{prompt}}", doc_to_choice="{{choices}}",
                        doc_to_target="gold", target_delimiter="",
                        metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]),
    "kl_task_ppl": dict(output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}",
                         metric_list=[{"metric": "word_perplexity"}]),
}


@pytest.fixture(scope="module")
def harness(server, engine, tok, tmp_path_factory):
    """lm-eval's `simple_evaluate` on the three local tasks, once per model: the task adapter
    (requests one by one) and the base (batches of 4 prompts per request). Offline: local files,
    the world's tokenizer from its directory, HF hub and datasets hub off."""
    import yaml

    d = tmp_path_factory.mktemp("lm_eval_tasks")
    docs = _docs(tok)
    data = d / "task.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in docs))
    for name, spec in TASKS.items():
        (d / f"{name}.yaml").write_text(yaml.safe_dump(_task(name, data, **spec)))
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(var, "1")
        mp.setenv("HF_DATASETS_CACHE", str(d / "cache"))
        import lm_eval
        from lm_eval.tasks import TaskManager

        tasks = TaskManager(include_path=str(d), include_defaults=False)  # only ours: no index of lm-eval's own
        for model, batch in (("replace-lx", 1), ("base", 4)):
            args = dict(base_url=server + "/v1/completions", model=model, tokenizer=str(WORLD.base_dir),
                        tokenizer_backend="huggingface", tokenized_requests=False, batch_size=batch,
                        max_length=engine.max_model_len, max_retries=1)  # one attempt: a refusal fails at once
            out[model] = lm_eval.simple_evaluate(
                model="local-completions", model_args=args, tasks=list(TASKS), task_manager=tasks, log_samples=True,
                random_seed=None, numpy_random_seed=None, torch_random_seed=None)  # leave the global RNGs alone
    return docs, out


@pytest.fixture(scope="module")
def expected(harness, engine, tok):
    """The engine's answers to the same requests, per model: greedy texts of the prompts, and
    log-likelihoods split into tokens the way lm-eval splits them (context, then what the context's
    tokens leave of the whole's), each choice after its prompt and each text after `<bos>` (the
    harness's prefix token for a rolling window). Computed in two batches."""
    docs, runs = harness
    models = list(runs)
    params = SamplingParams(temperature=0, max_tokens=16)
    prompts = [d["prompt"] for d in docs]
    greedy = engine.generate(prompts * len(models), [_adapter(m) for m in models for _ in docs], params)
    pairs = [(d["prompt"], c) for d in docs for c in d["choices"]] + [(tok.bos_token, d["text"]) for d in docs]
    seqs, items = [], []
    try:
        for context, continuation in pairs:
            ctx = tok.encode(context, add_special_tokens=False)
            whole = tok.encode(context + continuation, add_special_tokens=False)
            assert whole[:len(ctx)] == ctx and len(whole) > len(ctx)
            seqs.append(engine.open(ctx))
            items += [(seqs[-1], whole[len(ctx):], _adapter(m)) for m in models]
        scores = [sum(lp) for lp, _ in engine.score_many(items)]
    finally:
        for q in seqs:
            engine.close(q)
    out = {}
    for i, m in enumerate(models):
        lls = scores[i::len(models)]
        k = len(docs[0]["choices"])
        out[m] = {"greedy": [c.text for c in greedy[i * len(docs):(i + 1) * len(docs)]],
                  "choices": [lls[j * k:(j + 1) * k] for j in range(len(docs))], "rolling": lls[len(docs) * k:]}
    return out


def _adapter(model: str) -> str | None:
    return None if model == "base" else model


def _samples(run, task: str) -> list[dict]:
    return sorted(run["samples"][task], key=lambda s: s["doc_id"])


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=xs.__getitem__)


def test_lm_eval_generate_until_equals_the_engines_greedy_answers(harness, expected):
    docs, runs = harness
    for model, run in runs.items():
        samples = _samples(run, "kl_task_gen")
        assert [s["doc"]["prompt"] for s in samples] == [d["prompt"] for d in docs]
        want = expected[model]["greedy"]
        assert [s["filtered_resps"][0] for s in samples] == want == [s["resps"][0][0] for s in samples], model
        assert [s["exact_match"] for s in samples] == [float(w == d["answer"]) for w, d in zip(want, docs)]
        em = run["results"]["kl_task_gen"]["exact_match,none"]
        assert em == pytest.approx(sum(w == d["answer"] for w, d in zip(want, docs)) / len(docs))
    # non-vacuous: the model name picks the adapter, which answers the task; the base does not
    assert runs["replace-lx"]["results"]["kl_task_gen"]["exact_match,none"] == 1.0
    assert runs["base"]["results"]["kl_task_gen"]["exact_match,none"] < 0.5


def test_lm_eval_loglikelihoods_and_accuracy_equal_the_engines_scores(harness, expected):
    docs, runs = harness
    for model, run in runs.items():
        ref = expected[model]
        samples = _samples(run, "kl_task_mc")
        for s, d, want, g in zip(samples, docs, ref["choices"], ref["greedy"]):
            assert [a[1] for a in s["arguments"]] == d["choices"] and s["target"] == d["gold"]
            lls, is_greedy = zip(*s["filtered_resps"])
            assert list(lls) == pytest.approx(want, abs=ATOL), (model, s["doc_id"])
            assert [r[0][0] for r in s["resps"]] == list(lls)
            assert list(is_greedy) == [c == g + END for c in d["choices"]]  # every token the argmax: the greedy answer
            assert s["acc"] == float(_argmax(want) == d["gold"])
        acc = sum(_argmax(w) == d["gold"] for w, d in zip(ref["choices"], docs)) / len(docs)
        assert run["results"]["kl_task_mc"]["acc,none"] == pytest.approx(acc), model
        # the perplexity task: one rolling window per document, scored after the prefix token
        got = [s["filtered_resps"][0] for s in _samples(run, "kl_task_ppl")]
        assert got == pytest.approx(ref["rolling"], abs=ATOL), model
    # non-vacuous: the adapter changes every score, and ranks the answer first where the base does not
    a, b = (sum(expected[m]["choices"], []) + expected[m]["rolling"] for m in ("replace-lx", "base"))
    assert all(abs(x - y) > 1e-2 for x, y in zip(a, b))
    assert runs["replace-lx"]["results"]["kl_task_mc"]["acc,none"] > runs["base"]["results"]["kl_task_mc"]["acc,none"]


# --------------------------------------------------------------------------- litellm
@pytest.fixture(scope="module")
def litellm():
    """litellm, imported with its cost map read from the package (it fetches it at import
    otherwise) and its offline mode on. The SDK has no telemetry of its own to turn off."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        mp.setenv("LITELLM_OFFLINE_MODE", "true")
        import litellm

        yield litellm


@pytest.fixture
def via(server):
    """What every litellm call names: an OpenAI-compatible server at `api_base`, serving `base`."""
    return dict(model="openai/base", api_base=server + "/v1", api_key="unused", temperature=0, num_retries=0)


def _ignored(r) -> str | None:
    """The fields of litellm's request the server ignored (its header, as litellm passes it on)."""
    return r._hidden_params["additional_headers"].get("llm_provider-" + IGNORED_HEADER.lower())


def test_litellm_chat_and_stream_equal_the_engine(litellm, via, engine, tok, solved):
    plain = solved[3]
    messages = [{"role": "user", "content": PROBLEM}]
    r = litellm.completion(messages=messages, max_tokens=48, **via)
    c = r.choices[0]
    assert (c.message.content, c.finish_reason, c.message.tool_calls) == (plain, "stop", None)
    assert _ignored(r) is None  # everything litellm sends is understood...
    odd = litellm.completion(messages=messages, max_tokens=1, extra_body={"x_trace": 1}, **via)
    assert _ignored(odd) == "x_trace"  # ...which the header would say otherwise
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_tokens(tok, render(tok, PROBLEM)),
                                                                  n_tokens(tok, plain) + 1)  # + the end of sequence
    chunks = list(litellm.completion(messages=messages, max_tokens=48, stream=True,
                                     stream_options={"include_usage": True}, **via))
    assert len(chunks) > 2 and "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == plain
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["stop"]
    [usage] = [ch.usage for ch in chunks if getattr(ch, "usage", None)]
    assert (usage.prompt_tokens, usage.completion_tokens) == (r.usage.prompt_tokens, r.usage.completion_tokens)
    # an adapter is a model name too
    replaced = litellm.completion(messages=[{"role": "user", "content": "replace: hello"}], max_tokens=12,
                                  **{**via, "model": "openai/replace-lx"}).choices[0].message.content
    assert replaced == reference(engine, render(tok, "replace: hello"), "replace-lx", 12).text == TASK.apply("hello")


def test_litellm_tool_call_round_trip(litellm, via, solved):
    arg, result, after, _ = solved
    messages = [{"role": "user", "content": PROBLEM}]
    c = litellm.completion(messages=messages, tools=[CALC], max_tokens=48, **via).choices[0]
    [call] = c.message.tool_calls
    assert c.finish_reason == "tool_calls" and call.function.name == "calc"
    assert json.loads(call.function.arguments) == {"formula": arg}
    # the assistant message goes back as litellm returned it, as its docs show
    messages += [c.message, {"role": "tool", "tool_call_id": call.id, "content": str(calculate(arg))}]
    r = litellm.completion(messages=messages, tools=[CALC], max_tokens=48, **via)
    final = r.choices[0]
    assert _ignored(r) is None
    assert (final.message.content, final.finish_reason) == (after, "stop") and parse_answer(after) == ANSWER


# litellm's logging (`get_standard_logging_object_payload`) dumps a streamed response whose usage it
# has rewritten in chat's shape (`completion_tokens`) into its `ResponseAPIUsage`, and pydantic warns
@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings")
def test_litellm_responses(litellm, via, client, solved):
    arg, result, after, plain = solved
    r = litellm.responses(input=PROBLEM, max_output_tokens=48, **via)
    assert (r.status, r.output_text, _ignored(r)) == ("completed", plain, None)
    stored = litellm.get_responses(response_id=r.id, api_base=via["api_base"], api_key="unused",
                                   custom_llm_provider="openai")  # litellm's id wraps the server's
    assert stored.output_text == plain
    events = list(litellm.responses(input=PROBLEM, max_output_tokens=48, stream=True, **via))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == plain
    [done] = [e for e in events if e.type == "response.completed"]
    assert client.responses.retrieve(done.response.id).output_text == plain  # the server's own id: it was stored
    # a function call, and its output sent back under previous_response_id
    tools = [{"type": "function", "name": "calc", "description": "evaluate an arithmetic formula",
              "parameters": FORMULA}]
    r = litellm.responses(input=PROBLEM, tools=tools, max_output_tokens=48, **via)
    [call] = r.output
    assert (call.type, call.name, json.loads(call.arguments)) == ("function_call", "calc", {"formula": arg})
    r = litellm.responses(input=[{"type": "function_call_output", "call_id": call.call_id, "output": result}],
                          previous_response_id=r.id, tools=tools, max_output_tokens=48, **via)
    assert r.output_text == after and parse_answer(r.output_text) == ANSWER
