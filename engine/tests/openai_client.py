"""The official `openai` client against a running `flotilla-worker serve`.

Run by engine/tests/openai_client.rs as `python openai_client.py BASE_URL MODEL`. Each check
covers one request parameter: honoured (`stop`, `top_p`, `seed`, `logprobs`, `top_logprobs`,
`stream_options`), accepted only at its neutral value (`n`), or refused with a 400 that names it.
Prints one line per check and `N passed, N failed` last; exits non-zero on any failure.
"""

import sys
import traceback

import openai

BASE_URL, MODEL = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=BASE_URL, api_key="unused", max_retries=0, timeout=60)
PROMPT = "The fleet"
CHAT = [{"role": "user", "content": "Where is the fleet?"}]

checks = []


def check(fn):
    checks.append(fn)
    return fn


def complete(**kw):
    kw.setdefault("max_tokens", 24)
    return client.completions.create(model=MODEL, prompt=PROMPT, **kw)


def chat(**kw):
    kw.setdefault("max_tokens", 24)
    return client.chat.completions.create(model=MODEL, messages=CHAT, **kw)


def greedy_text():
    return complete(temperature=0).choices[0].text


def refused(param, call):
    try:
        call()
    except openai.BadRequestError as e:
        assert e.status_code == 400, e
        assert e.param == param, f"param {e.param!r}, expected {param!r}: {e.message}"
        assert f"`{param}`" in e.message, e.message
        return e.message
    raise AssertionError(f"`{param}` was accepted")


def a_stop_sequence(text):
    """A two-character stop sequence taken from the middle of `text`."""
    assert len(text) >= 8, f"too little text to pick a stop sequence from: {text!r}"
    return text[4:6]


@check
def stop_ends_the_text_before_the_sequence():
    text = greedy_text()
    stop = a_stop_sequence(text)
    want = text[: text.find(stop)]
    for value in (stop, [stop], ["\u0000never", stop]):
        c = complete(temperature=0, stop=value).choices[0]
        assert (c.text, c.finish_reason) == (want, "stop"), (value, c, text)
    reply = chat(temperature=0).choices[0].message.content
    stop = a_stop_sequence(reply)
    c = chat(temperature=0, stop=stop).choices[0]
    assert c.message.content == reply[: reply.find(stop)], (c, reply)
    assert c.finish_reason == "stop"
    refused("stop", lambda: complete(stop=["a", "b", "c", "d", "e"]))


@check
def stop_applies_to_streams_too():
    text = greedy_text()
    stop = a_stop_sequence(text)
    chunks = list(complete(temperature=0, stop=stop, stream=True))
    streamed = "".join(c.choices[0].text for c in chunks)
    assert streamed == text[: text.find(stop)], (streamed, text)
    assert chunks[-1].choices[0].finish_reason == "stop"
    reply = chat(temperature=0).choices[0].message.content
    stop = a_stop_sequence(reply)
    chunks = list(chat(temperature=0, stop=[stop], stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == reply[: reply.find(stop)], (streamed, reply)
    assert chunks[-1].choices[0].finish_reason == "stop"


@check
def seed_makes_sampling_repeatable():
    a = complete(temperature=1.0, seed=7).choices[0].text
    b = complete(temperature=1.0, seed=7).choices[0].text
    assert a == b, (a, b)
    others = {complete(temperature=1.0, seed=s).choices[0].text for s in (8, 9, 10)}
    assert others != {a}, "every seed drew the same text"
    c = chat(temperature=1.0, seed=7).choices[0].message.content
    assert c == chat(temperature=1.0, seed=7).choices[0].message.content


@check
def top_p_restricts_sampling_to_the_nucleus():
    # A nucleus this small holds only the most likely token: sampling becomes greedy.
    narrow = complete(temperature=1.0, top_p=1e-6, seed=3).choices[0].text
    assert narrow == greedy_text(), narrow
    wide = {complete(temperature=1.0, top_p=1.0, seed=s).choices[0].text for s in (3, 4, 5)}
    assert wide != {narrow}, "top_p=1 sampled only the greedy text"
    refused("top_p", lambda: complete(top_p=0))
    refused("top_p", lambda: complete(top_p=1.5))


@check
def n_above_one_is_refused_by_name():
    assert len(complete(n=1).choices) == 1
    assert len(chat(n=1).choices) == 1
    message = refused("n", lambda: complete(n=2))
    assert "got 2" in message, message
    refused("n", lambda: chat(n=3))


@check
def completion_logprobs_cover_every_token_with_the_top_alternatives():
    r = complete(temperature=0, logprobs=3, max_tokens=12)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert n == 12 and len(lp.tokens) == n and len(lp.token_logprobs) == n, lp
    assert len(lp.top_logprobs) == n and all(len(t) == 3 for t in lp.top_logprobs), lp
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        # Greedy picks the most likely token, so its logprob is the best alternative's.
        assert chosen <= 0 and abs(chosen - max(top.values())) < 1e-4, (chosen, top)
    assert lp.text_offset == list(range(n)), lp.text_offset
    assert complete(max_tokens=2).choices[0].logprobs is None
    refused("logprobs", lambda: complete(logprobs=6))


@check
def chat_logprobs_with_top_logprobs_in_full_and_streamed_answers():
    r = chat(temperature=0, logprobs=True, top_logprobs=2, max_tokens=10)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 10, content
    for tok in content:
        assert len(tok.top_logprobs) == 2 and tok.logprob <= 0 and len(tok.bytes) == 1, tok
        assert abs(tok.logprob - tok.top_logprobs[0].logprob) < 1e-4, tok
    chunks = list(chat(temperature=0, logprobs=True, max_tokens=10, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content], (streamed, content)
    refused("top_logprobs", lambda: chat(top_logprobs=2))
    refused("top_logprobs", lambda: chat(logprobs=True, top_logprobs=21))


@check
def stream_options_include_usage_adds_a_usage_chunk():
    chunks = list(chat(max_tokens=5, stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 5, last
    assert all(c.usage is None for c in chunks[:-1])


@check
def parameters_the_engine_cannot_honour_are_refused_by_name():
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for param, call in [
        ("tools", lambda: chat(tools=[tool])),
        ("tool_choice", lambda: chat(tool_choice="required")),
        ("response_format", lambda: chat(response_format={"type": "json_object"})),
        ("presence_penalty", lambda: chat(presence_penalty=0.5)),
        ("frequency_penalty", lambda: complete(frequency_penalty=1.0)),
        ("logit_bias", lambda: chat(logit_bias={"65": 10})),
        ("best_of", lambda: complete(best_of=2)),
        ("echo", lambda: complete(echo=True)),
        ("suffix", lambda: complete(suffix="end")),
    ]:
        refused(param, call)
    # Their neutral values are what SDKs send by default: accepted.
    ok = chat(presence_penalty=0, frequency_penalty=0, logit_bias={}, response_format={"type": "text"})
    assert ok.choices[0].finish_reason == "length"


passed = failed = 0
for fn in checks:
    try:
        fn()
        passed += 1
        print(f"ok   {fn.__name__}")
    except Exception:  # noqa: BLE001 - every failure is reported, then counted
        failed += 1
        print(f"FAIL {fn.__name__}")
        traceback.print_exc(file=sys.stdout)
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
