"""Drives a running Canopy node with the official `openai` Python client.

Usage: python openai_client.py --base-url http://127.0.0.1:PORT/v1 --model MODEL

Checks that what the client library sees is what OpenAI's API would give it: the model list,
a plain chat completion, a streamed one (deltas joined, finish reason, usage chunk),
log-probabilities (plain and streamed), `n` choices, the penalties and `logit_bias`, structured
output (`response_format` with a JSON schema, and a JSON object streamed), tool calls
(`tool_choice` required and a named function, plain and streamed, and a round trip with the
tool's answer as a `tool` message), and the
typed errors the client raises for an unknown model (NotFoundError) and for bad parameters
(BadRequestError). Prints one line per check and exits non-zero if any check failed.
Started by tests/node_model.rs, which starts the node and installs the client in a venv.
"""

import argparse
import json
import math
import sys
from checks import Checks

import openai

PROMPT = "What is 2+2? Reply with just the number."


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    args = parser.parse_args()

    client = openai.OpenAI(
        base_url=args.base_url, api_key="not-needed", max_retries=0, timeout=120.0
    )
    model = args.model
    checks = Checks()
    check = checks.check

    params = dict(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=32,
        temperature=0,
        seed=42,
    )
    plain = {}

    @check("models.list shows the model")
    def _():
        ids = [m.id for m in client.models.list()]
        assert model in ids, ids

    @check("chat.completions.create")
    def _():
        resp = client.chat.completions.create(**params)
        assert resp.object == "chat.completion", resp
        assert resp.id, resp
        assert resp.model == model, resp
        assert len(resp.choices) == 1, resp
        choice = resp.choices[0]
        assert choice.index == 0, choice
        assert choice.message.role == "assistant", choice
        assert isinstance(choice.message.content, str), choice
        assert choice.message.content.strip(), f"empty content: {resp}"
        assert choice.finish_reason in ("stop", "length"), choice
        usage = resp.usage
        assert usage is not None, resp
        assert usage.prompt_tokens > 0 and usage.completion_tokens > 0, usage
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, usage
        plain["content"] = choice.message.content
        plain["usage"] = usage
        print(f"     content: {choice.message.content!r}", flush=True)

    @check("chat.completions.create(stream=True)")
    def _():
        stream = client.chat.completions.create(
            **params, stream=True, stream_options={"include_usage": True}
        )
        deltas, finish, usage, ids, roles = [], None, None, set(), []
        for chunk in stream:
            assert chunk.object == "chat.completion.chunk", chunk
            ids.add(chunk.id)
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.role:
                    roles.append(choice.delta.role)
                if choice.delta.content:
                    deltas.append(choice.delta.content)
                if choice.finish_reason:
                    assert finish is None, "two finish reasons"
                    finish = choice.finish_reason
        text = "".join(deltas)
        assert len(ids) == 1, f"chunks carry different ids: {ids}"
        assert roles[:1] == ["assistant"], roles
        assert len(deltas) >= 1, "no content deltas"
        assert finish in ("stop", "length"), finish
        assert usage is not None, "no usage chunk despite include_usage"
        assert usage.completion_tokens > 0, usage
        print(f"     streamed in {len(deltas)} deltas: {text!r}", flush=True)
        if "content" in plain:
            # Same prompt, greedy, same seed: the stream says what the plain answer said.
            assert text == plain["content"], (text, plain["content"])
            assert usage.completion_tokens == plain["usage"].completion_tokens, usage

    @check("logprobs=True, top_logprobs=3")
    def _():
        resp = client.chat.completions.create(**params, logprobs=True, top_logprobs=3)
        choice = resp.choices[0]
        entries = choice.logprobs.content
        # One entry per generated token; their bytes are the answer's text.
        assert len(entries) == resp.usage.completion_tokens, (len(entries), resp.usage)
        joined = b"".join(bytes(e.bytes) for e in entries).decode("utf-8")
        assert joined == choice.message.content, (joined, choice.message.content)
        for e in entries:
            assert e.logprob <= 0.0, e
            assert len(e.top_logprobs) == 3, e
            tops = [t.logprob for t in e.top_logprobs]
            assert tops == sorted(tops, reverse=True), tops
            # Greedy: the chosen token is the most likely one.
            assert math.isclose(e.logprob, tops[0], abs_tol=1e-6), (e.logprob, tops)
            assert sum(math.exp(t) for t in tops) <= 1.0 + 1e-4, tops
        if "content" in plain:
            # Asking for log-probabilities does not change the tokens.
            assert choice.message.content == plain["content"], choice.message.content
        print(f"     first token {entries[0].token!r}: {entries[0].logprob:.4f}", flush=True)

    @check("logprobs in a stream")
    def _():
        stream = client.chat.completions.create(
            **params, logprobs=True, top_logprobs=1, stream=True,
            stream_options={"include_usage": True},
        )
        entries, text, usage = [], [], None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    text.append(choice.delta.content)
                if choice.logprobs is not None and choice.logprobs.content:
                    entries.extend(choice.logprobs.content)
        assert usage is not None and len(entries) == usage.completion_tokens, (len(entries), usage)
        joined = b"".join(bytes(e.bytes) for e in entries).decode("utf-8")
        assert joined == "".join(text), (joined, text)

    @check("n=3 gives three seeded choices")
    def _():
        sampled = {**params, "temperature": 1.0, "seed": 1234, "n": 3, "max_tokens": 12}
        first = client.chat.completions.create(**sampled)
        assert [c.index for c in first.choices] == [0, 1, 2], first
        texts = [c.message.content for c in first.choices]
        assert all(isinstance(t, str) for t in texts), texts
        # The prompt counts once; the completions add up.
        single = client.chat.completions.create(**{**sampled, "n": 1})
        assert first.usage.prompt_tokens == single.usage.prompt_tokens, (first.usage, single.usage)
        assert first.usage.completion_tokens >= 3, first.usage
        # Choice 0 is the n=1 answer with the same seed; the whole answer repeats.
        assert texts[0] == single.choices[0].message.content, (texts, single)
        again = client.chat.completions.create(**sampled)
        assert [c.message.content for c in again.choices] == texts, (texts, again)
        print(f"     choices: {texts!r}", flush=True)

    @check("n=2 in a stream finishes each choice")
    def _():
        stream = client.chat.completions.create(
            **{**params, "n": 2, "max_tokens": 8}, stream=True
        )
        finishes, text = {}, {0: [], 1: []}
        for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    text[choice.index].append(choice.delta.content)
                if choice.finish_reason:
                    assert choice.index not in finishes, "two finish reasons"
                    finishes[choice.index] = choice.finish_reason
        assert sorted(finishes) == [0, 1], finishes
        # Greedy: both choices say the same.
        assert "".join(text[0]) == "".join(text[1]), text

    @check("logit_bias +100 forces a token; penalties are accepted")
    def _():
        resp = client.chat.completions.create(
            **{**params, "max_tokens": 5}, logit_bias={"1000": 100}, logprobs=True
        )
        tokens = [e.token for e in resp.choices[0].logprobs.content]
        assert len(tokens) == 5 and len(set(tokens)) == 1, tokens
        resp = client.chat.completions.create(
            **{**params, "max_tokens": 24}, presence_penalty=1.5, frequency_penalty=1.0
        )
        assert resp.choices[0].message.content is not None, resp

    @check("response_format json_schema: the reply validates")
    def _():
        schema = {
            "type": "object",
            "properties": {"answer": {"type": "integer"}, "unit": {"type": "string"}},
            "required": ["answer", "unit"],
            "additionalProperties": False,
        }
        resp = client.chat.completions.create(
            **{**params, "max_tokens": 64},
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "sum", "schema": schema, "strict": True},
            },
        )
        choice = resp.choices[0]
        assert choice.finish_reason == "stop", choice
        value = json.loads(choice.message.content)
        assert set(value) == {"answer", "unit"}, value
        assert isinstance(value["answer"], int), value
        assert isinstance(value["unit"], str), value

    @check("response_format json_object, streamed: the joined deltas parse")
    def _():
        parts, finish = [], None
        for chunk in client.chat.completions.create(
            **{
                **params,
                "max_tokens": 160,
                "messages": [{"role": "user", "content": "Describe a cat as a JSON object."}],
            },
            response_format={"type": "json_object"},
            stream=True,
        ):
            for choice in chunk.choices:
                parts.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        text = "".join(parts)
        # A budget cut can end inside the object, as on every server; a finished one parses.
        if finish == "stop":
            assert isinstance(json.loads(text), dict), text
        else:
            assert finish == "length" and text.startswith("{"), (finish, text)

    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 40},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    }
    add = {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Adds two integers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    }
    ask_weather = [{"role": "user", "content": "What is the weather in Paris?"}]

    def check_weather_args(text):
        args = json.loads(text)
        assert set(args) == {"city", "unit"}, args
        assert isinstance(args["city"], str) and len(args["city"]) <= 40, args
        assert args["unit"] in ("celsius", "fahrenheit"), args
        return args

    @check("tool_choice required: one call whose arguments validate")
    def _():
        resp = client.chat.completions.create(
            **{**params, "max_tokens": 96, "messages": ask_weather},
            tools=[weather, add],
            tool_choice="required",
        )
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        calls = choice.message.tool_calls
        assert calls and len(calls) == 1, choice.message
        call = calls[0]
        assert call.type == "function" and call.id.startswith("call_"), call
        if call.function.name == "get_weather":
            check_weather_args(call.function.arguments)
        else:
            assert call.function.name == "add", call
            args = json.loads(call.function.arguments)
            assert isinstance(args["a"], int) and isinstance(args["b"], int), args

    @check("a named tool_choice, streamed: the call comes in tool_calls deltas")
    def _():
        name, arguments, finish = None, "", None
        for chunk in client.chat.completions.create(
            **{**params, "max_tokens": 96, "messages": ask_weather},
            tools=[weather, add],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            stream=True,
        ):
            for choice in chunk.choices:
                assert not choice.delta.content, choice.delta
                for call in choice.delta.tool_calls or []:
                    assert call.index == 0, call
                    name = call.function.name or name
                    arguments += call.function.arguments or ""
                finish = choice.finish_reason or finish
        assert finish == "tool_calls", finish
        assert name == "get_weather", name
        check_weather_args(arguments)

    @check("a tool's answer as a tool message: the model answers in text")
    def _():
        first = client.chat.completions.create(
            **{**params, "max_tokens": 96, "messages": ask_weather},
            tools=[weather],
            tool_choice="required",
        )
        call = first.choices[0].message.tool_calls[0]
        resp = client.chat.completions.create(
            **{
                **params,
                "max_tokens": 24,
                "messages": ask_weather
                + [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [call.model_dump()],
                    },
                    {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
                ],
            },
            tools=[weather],
            tool_choice="none",
        )
        choice = resp.choices[0]
        assert choice.message.tool_calls is None, choice.message
        assert choice.message.content, choice.message

    @check("unknown model raises NotFoundError")
    def _():
        try:
            client.chat.completions.create(**{**params, "model": "no-such-model"})
        except openai.NotFoundError as err:
            assert err.status_code == 404, err
            assert "no-such-model" in str(err), err
        else:
            raise AssertionError("no error")

    @check("unknown model with stream=True raises NotFoundError")
    def _():
        try:
            for _ in client.chat.completions.create(
                **{**params, "model": "no-such-model"}, stream=True
            ):
                pass
        except openai.NotFoundError as err:
            assert err.status_code == 404, err
        else:
            raise AssertionError("no error")

    bad = [
        ("temperature=5", {"temperature": 5}, "temperature"),
        ("top_p=1.5", {"top_p": 1.5}, "top_p"),
        ("max_tokens=0", {"max_tokens": 0}, "max_tokens"),
        ("n=17", {"n": 17}, "n"),
        ("top_logprobs=21", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("logit_bias out of the vocabulary", {"logit_bias": {"99999999": 1}}, "logit_bias"),
        ("response_format xml", {"response_format": {"type": "xml"}}, "response_format.type"),
        ("no messages", {"messages": []}, "messages"),
        ("unknown role", {"messages": [{"role": "wizard", "content": "x"}]}, "role"),
        (
            "tool_choice naming an unknown function",
            {"tools": [weather], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        (
            "a tool named with a space",
            {"tools": [{"type": "function", "function": {"name": "get weather"}}]},
            "tools[0].function.name",
        ),
    ]
    for name, override, param in bad:

        @check(f"bad params ({name}) raise BadRequestError")
        def _(override=override, param=param):
            try:
                client.chat.completions.create(**{**params, **override})
            except openai.BadRequestError as err:
                assert err.status_code == 400, err
                body = err.body if isinstance(err.body, dict) else {}
                assert param in str(body.get("param")) or param in str(err), (param, err)
            else:
                raise AssertionError("no error")

    @check("the node still serves after the errors")
    def _():
        resp = client.chat.completions.create(**{**params, "max_tokens": 4})
        assert resp.choices[0].message.content is not None, resp

    return checks.exit_code('openai client')


if __name__ == "__main__":
    sys.exit(main())
