"""Drives a running Canopy node with the official `ollama` Python client.

Usage: python ollama_client.py --host http://127.0.0.1:PORT --model MODEL

Checks that what the client library sees is what Ollama's API would give it: the model list
(`list`), a model's details (`show`), the running models (`ps`), chat and generate, plain and
streamed (pieces joined, the final object's counts), a system prompt, a raw prompt, `format`
with a JSON schema (the reply validates), `logprobs` with `top_logprobs`, `tools` (the answer is text or calls of the
offered tools, and a round trip with a `tool` message is answered), and the
`ResponseError`s the client raises for an unknown model (404) and for refused fields (400).
Prints one line per check and exits non-zero if any check failed. Started by
tests/api_compat.rs, which starts the node and installs the client in a venv.
"""

import argparse
import json
import sys
from checks import Checks

import ollama

PROMPT = "What is 2+2? Reply with just the number."


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--model", required=True)
    args = parser.parse_args()

    client = ollama.Client(host=args.host, timeout=120.0)
    model = args.model
    checks = Checks()
    check = checks.check

    options = {"temperature": 0, "seed": 42, "num_predict": 16}
    messages = [{"role": "user", "content": PROMPT}]
    plain = {}

    @check("list shows the model with its GGUF details")
    def _():
        listed = client.list()
        found = [m for m in listed.models if m.model == model]
        assert found, [m.model for m in listed.models]
        entry = found[0]
        assert entry.size and entry.size > 1_000_000, entry
        assert entry.modified_at is not None, entry
        details = entry.details
        assert details.format == "gguf", details
        assert details.family == "llama", details
        assert details.parameter_size and details.parameter_size.endswith("M"), details
        assert details.quantization_level == "Q4_1", details

    @check("show gives details, template and model_info")
    def _():
        shown = client.show(model)
        assert shown.details.family == "llama", shown.details
        assert shown.template and "im_start" in shown.template, shown.template
        assert shown.modelinfo["general.architecture"] == "llama", shown.modelinfo
        assert shown.modelinfo["general.parameter_count"] > 100_000_000, shown.modelinfo
        assert "completion" in (shown.capabilities or []), shown.capabilities

    @check("ps lists the loaded model")
    def _():
        running = client.ps()
        names = [m.model for m in running.models]
        assert model in names, names
        entry = [m for m in running.models if m.model == model][0]
        assert entry.context_length and entry.context_length >= 2048, entry

    @check("chat")
    def _():
        resp = client.chat(model=model, messages=messages, options=options)
        assert resp.done is True, resp
        assert resp.done_reason in ("stop", "length"), resp
        assert resp.message.role == "assistant", resp
        assert resp.message.content.strip(), f"empty content: {resp}"
        assert "4" in resp.message.content, resp.message.content
        assert resp.prompt_eval_count > 10, resp
        assert 0 < resp.eval_count <= 16, resp
        assert resp.total_duration > 0 and resp.eval_duration >= 0, resp
        plain["chat"] = resp
        print(f"     content: {resp.message.content!r}", flush=True)

    @check("chat(stream=True)")
    def _():
        parts = list(client.chat(model=model, messages=messages, options=options, stream=True))
        assert len(parts) >= 2, parts
        last = parts[-1]
        assert last.done is True and all(not p.done for p in parts[:-1]), parts
        text = "".join(p.message.content or "" for p in parts)
        print(f"     streamed in {len(parts) - 1} pieces: {text!r}", flush=True)
        if "chat" in plain:
            # Same prompt, greedy, same seed: the stream says what the plain answer said.
            assert text == plain["chat"].message.content, (text, plain["chat"].message.content)
            assert last.eval_count == plain["chat"].eval_count, last

    @check("generate, plain and streamed, with a system prompt")
    def _():
        resp = client.generate(
            model=model, prompt=PROMPT, system="You answer with digits only.", options=options
        )
        assert resp.done is True and resp.response.strip(), resp
        parts = list(
            client.generate(
                model=model,
                prompt=PROMPT,
                system="You answer with digits only.",
                options=options,
                stream=True,
            )
        )
        text = "".join(p.response or "" for p in parts)
        assert text == resp.response, (text, resp.response)
        assert parts[-1].done_reason in ("stop", "length"), parts[-1]

    @check("generate(raw=True) continues the text as it is")
    def _():
        resp = client.generate(
            model=model, prompt="The capital of France is", raw=True, options=options
        )
        assert resp.response.strip(), resp
        # No chat template around it: the prompt is only a few tokens.
        assert resp.prompt_eval_count < 12, resp
        print(f"     raw: {resp.response!r}", flush=True)

    @check("chat with a format schema: the reply validates")
    def _():
        schema = {
            "type": "object",
            "properties": {"answer": {"type": "integer"}},
            "required": ["answer"],
            "additionalProperties": False,
        }
        resp = client.chat(
            model=model,
            messages=messages,
            format=schema,
            options={"temperature": 0, "num_predict": 48},
        )
        assert resp.done_reason == "stop", resp
        value = json.loads(resp.message.content)
        assert list(value) == ["answer"] and isinstance(value["answer"], int), value

    @check("chat with logprobs=True, top_logprobs=2")
    def _():
        resp = client.chat(
            model=model,
            messages=messages,
            logprobs=True,
            top_logprobs=2,
            options={"temperature": 0, "num_predict": 8},
        )
        assert resp.logprobs, resp
        for entry in resp.logprobs:
            assert entry.logprob <= 0, entry
            assert entry.top_logprobs is not None and len(entry.top_logprobs) <= 2, entry
        assert "".join(e.token for e in resp.logprobs) == resp.message.content, resp

    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }

    @check("chat with tools: text or calls of the offered tool, then a tool round trip")
    def _():
        ask = [{"role": "user", "content": "What is the weather in Paris?"}]
        resp = client.chat(
            model=model,
            messages=ask,
            tools=[weather],
            options={"temperature": 0, "num_predict": 64},
        )
        assert resp.done is True, resp
        for call in resp.message.tool_calls or []:
            assert call.function.name == "get_weather", call
            assert isinstance(call.function.arguments, dict), call
        assert resp.message.content or resp.message.tool_calls, resp
        answer = client.chat(
            model=model,
            messages=ask
            + [
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
                    ],
                },
                {"role": "tool", "content": "Sunny, 21 C"},
            ],
            options={"temperature": 0, "num_predict": 16},
        )
        assert answer.done is True and answer.message.content, answer

    @check("unknown model raises ResponseError 404")
    def _():
        try:
            client.chat(model="no-such-model", messages=messages)
        except ollama.ResponseError as err:
            assert err.status_code == 404, err
            assert "no-such-model" in err.error, err
        else:
            raise AssertionError("no error")

    @check("unknown model with stream=True raises ResponseError 404")
    def _():
        try:
            for _ in client.generate(model="no-such-model", prompt="x", stream=True):
                pass
        except ollama.ResponseError as err:
            assert err.status_code == 404, err
        else:
            raise AssertionError("no error")

    @check("show of an unknown model raises ResponseError 404")
    def _():
        try:
            client.show("no-such-model")
        except ollama.ResponseError as err:
            assert err.status_code == 404, err
        else:
            raise AssertionError("no error")

    refused = [
        ("options num_ctx", {"options": {"num_ctx": 4096}}, "options.num_ctx"),
        ("think=True", {"think": True}, "think"),
    ]
    for name, override, field in refused:

        @check(f"refused field ({name}) raises ResponseError 400 naming it")
        def _(override=override, field=field):
            try:
                client.chat(**{"model": model, "messages": messages, **override})
            except ollama.ResponseError as err:
                assert err.status_code == 400, err
                assert f"'{field}'" in err.error, err
            else:
                raise AssertionError("no error")

    @check("the node still serves after the errors")
    def _():
        resp = client.generate(model=model, prompt="Hi", options={"num_predict": 2})
        assert resp.done is True, resp

    return checks.exit_code('ollama client')


if __name__ == "__main__":
    sys.exit(main())
