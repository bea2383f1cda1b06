"""Drives a running Canopy node with the official `anthropic` Python client.

Usage: python anthropic_client.py --base-url http://127.0.0.1:PORT --model MODEL [--api-key KEY]

Checks that what the client library sees is what Anthropic's Messages API would give it:
`messages.create` (the message object, its text block, stop reason and usage), a stream with
`messages.stream` (text collected from the events equals the final message's, the final
message's usage), a system prompt, `stop_sequences` (the stop sequence never appears in the
text; `stop_reason` names it), `max_tokens` reached (`stop_reason == "max_tokens"`), tool
use (`tool_choice` any and a named tool, plain and streamed: a `tool_use` block whose input
validates, then a round trip with the `tool_result`), `messages.count_tokens` (equal to a
message's `input_tokens`), and the errors the client raises:
`NotFoundError` for an unknown model, `BadRequestError` for a refused field (a server tool,
`thinking`) or a missing `max_tokens`, and `AuthenticationError` for a wrong key when the node
has one. The key is sent with `api_key=` (the client sends it as `x-api-key`). Prints one line
per check and exits non-zero if any check failed. Started by tests/api_compat.rs, which starts
the node and installs the client in a venv.
"""

import argparse
import sys
from checks import Checks

import anthropic

PROMPT = "What is 2+2? Reply with just the number."
MAX_TOKENS = 16


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()

    # A node without a key takes any; the client insists on having one.
    key = args.api_key or "no-key-needed"
    client = anthropic.Anthropic(
        base_url=args.base_url, api_key=key, timeout=120.0, max_retries=0
    )
    model = args.model
    checks = Checks()
    check = checks.check

    messages = [{"role": "user", "content": PROMPT}]
    # The client no longer has parameters for the sampling fields; the API still takes them.
    greedy = {"extra_body": {"temperature": 0, "top_k": 1}}
    plain = {}

    @check("messages.create")
    def _():
        msg = client.messages.create(
            model=model, max_tokens=MAX_TOKENS, messages=messages, **greedy
        )
        assert msg.type == "message" and msg.role == "assistant", msg
        assert msg.id.startswith("msg_"), msg.id
        assert msg.model == model, msg.model
        assert len(msg.content) == 1 and msg.content[0].type == "text", msg.content
        text = msg.content[0].text
        assert text.strip(), f"empty text: {msg}"
        assert "4" in text, text
        assert msg.stop_reason in ("end_turn", "max_tokens"), msg.stop_reason
        assert msg.stop_sequence is None, msg
        assert msg.usage.input_tokens > 10, msg.usage
        assert 0 < msg.usage.output_tokens <= MAX_TOKENS, msg.usage
        plain["msg"] = msg
        print(f"     text: {text!r}", flush=True)

    @check("messages.stream collects the text and the final message")
    def _():
        with client.messages.stream(
            model=model, max_tokens=MAX_TOKENS, messages=messages, **greedy
        ) as stream:
            pieces = list(stream.text_stream)
            final = stream.get_final_message()
        text = "".join(pieces)
        assert pieces, "no text events"
        assert final.content[0].text == text, (final.content, text)
        assert final.stop_reason in ("end_turn", "max_tokens"), final
        assert final.usage.input_tokens > 10, final.usage
        assert 0 < final.usage.output_tokens <= MAX_TOKENS, final.usage
        print(f"     streamed in {len(pieces)} pieces: {text!r}", flush=True)
        if "msg" in plain:
            # Same prompt, greedy: the stream says what the plain answer said.
            assert text == plain["msg"].content[0].text, (text, plain["msg"].content)
            assert final.usage.output_tokens == plain["msg"].usage.output_tokens, final.usage
            assert final.usage.input_tokens == plain["msg"].usage.input_tokens, final.usage

    @check("messages.count_tokens equals a message's input_tokens")
    def _():
        counted = client.messages.count_tokens(model=model, messages=messages)
        assert counted.input_tokens == plain["msg"].usage.input_tokens, (
            counted,
            plain["msg"].usage,
        )
        # The model's template adds a system prompt of its own when there is none, so
        # compare two of ours.
        short = client.messages.count_tokens(
            model=model, messages=messages, system="Be a pirate."
        )
        long = client.messages.count_tokens(
            model=model,
            messages=messages,
            system="Be a pirate who sails the seven seas and speaks only in rhymes.",
        )
        assert long.input_tokens > short.input_tokens, (short, long)

    @check("a system prompt reaches the model")
    def _():
        msg = client.messages.create(
            model=model,
            max_tokens=MAX_TOKENS,
            system="You are a pirate. Always answer in pirate speech.",
            messages=messages,
            **greedy,
        )
        assert msg.content[0].text.strip(), msg
        listed = client.messages.create(
            model=model,
            max_tokens=4,
            system=[{"type": "text", "text": "Be brief."}],
            messages=[{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
        )
        assert listed.content[0].type == "text", listed
        # The system text is in the prompt: the longer one costs more input tokens. (Not
        # compared with no system prompt: the model's template then adds a default one.)
        assert msg.usage.input_tokens > listed.usage.input_tokens, (msg.usage, listed.usage)

    @check("stop_sequences cut the answer before the stop sequence")
    def _():
        base = plain.get("msg")
        assert base is not None, "needs the plain answer"
        text = base.content[0].text
        # A stop sequence the greedy answer contains, past its first character.
        words = [w for w in text.split() if len(w) > 1]
        stop = words[-1] if words else text.strip()[-1]
        at = text.find(stop)
        msg = client.messages.create(
            model=model,
            max_tokens=MAX_TOKENS,
            messages=messages,
            stop_sequences=[stop],
            **greedy,
        )
        got = msg.content[0].text
        assert stop not in got, (stop, got)
        assert got == text[:at], (got, text[:at], stop)
        # The engine says which stop ended the answer.
        assert msg.stop_reason == "stop_sequence", msg.stop_reason
        assert msg.stop_sequence == stop, msg.stop_sequence
        print(f"     stop {stop!r}: {got!r}", flush=True)

    @check("max_tokens reached is stop_reason max_tokens")
    def _():
        msg = client.messages.create(
            model=model, max_tokens=2, messages=messages, **greedy
        )
        assert msg.usage.output_tokens <= 2, msg.usage
        if msg.usage.output_tokens == 2:
            assert msg.stop_reason == "max_tokens", msg

    @check("unknown model raises NotFoundError")
    def _():
        try:
            client.messages.create(model="no-such-model", max_tokens=4, messages=messages)
        except anthropic.NotFoundError as err:
            assert err.status_code == 404, err
            assert err.body["error"]["type"] == "not_found_error", err.body
            assert "no-such-model" in err.message, err
        else:
            raise AssertionError("no error")

    @check("unknown model in a stream raises NotFoundError")
    def _():
        try:
            with client.messages.stream(
                model="no-such-model", max_tokens=4, messages=messages
            ) as stream:
                stream.until_done()
        except anthropic.NotFoundError as err:
            assert err.status_code == 404, err
        else:
            raise AssertionError("no error")

    weather = {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "input_schema": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    }
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]

    def check_input(value):
        assert set(value) == {"city", "unit"}, value
        assert isinstance(value["city"], str) and len(value["city"]) <= 40, value
        assert value["unit"] in ("celsius", "fahrenheit"), value

    @check("tool_choice any: a tool_use block whose input validates")
    def _():
        msg = client.messages.create(
            model=model,
            max_tokens=96,
            messages=ask,
            tools=[weather],
            tool_choice={"type": "any"},
        )
        assert msg.stop_reason == "tool_use", msg
        uses = [b for b in msg.content if b.type == "tool_use"]
        assert len(uses) == 1, msg.content
        assert uses[0].name == "get_weather" and uses[0].id.startswith("toolu_"), uses
        check_input(uses[0].input)

        answer = client.messages.create(
            model=model,
            max_tokens=24,
            tools=[weather],
            tool_choice={"type": "none"},
            messages=ask
            + [
                {"role": "assistant", "content": [u.model_dump() for u in uses]},
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": uses[0].id,
                            "content": "Sunny, 21 C",
                        }
                    ],
                },
            ],
        )
        assert answer.stop_reason in ("end_turn", "max_tokens"), answer
        assert all(b.type == "text" for b in answer.content), answer.content

    @check("a named tool, streamed: the final message holds the tool_use")
    def _():
        with client.messages.stream(
            model=model,
            max_tokens=96,
            messages=ask,
            tools=[weather],
            tool_choice={"type": "tool", "name": "get_weather"},
        ) as stream:
            final = stream.get_final_message()
        assert final.stop_reason == "tool_use", final
        uses = [b for b in final.content if b.type == "tool_use"]
        assert len(uses) == 1 and uses[0].name == "get_weather", final.content
        check_input(uses[0].input)

    refused = [
        (
            "tools[0].type",
            {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
        ),
        ("thinking", {"thinking": {"type": "enabled", "budget_tokens": 1024}}),
    ]
    for field, extra in refused:

        @check(f"refused field ({field}) raises BadRequestError naming it")
        def _(field=field, extra=extra):
            try:
                client.messages.create(
                    model=model, max_tokens=4, messages=messages, **extra
                )
            except anthropic.BadRequestError as err:
                assert err.status_code == 400, err
                assert err.body["error"]["type"] == "invalid_request_error", err.body
                assert field in err.message, err
            else:
                raise AssertionError("no error")

    @check("an image block raises BadRequestError naming it")
    def _():
        image = {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": "aGk="},
        }
        try:
            client.messages.create(
                model=model,
                max_tokens=4,
                messages=[{"role": "user", "content": [image]}],
            )
        except anthropic.BadRequestError as err:
            assert "messages[0].content[0]" in err.message and "image" in err.message, err
        else:
            raise AssertionError("no error")

    if args.api_key:

        @check("a wrong key raises AuthenticationError")
        def _():
            wrong = anthropic.Anthropic(
                base_url=args.base_url, api_key="wrong-key-0123456789", max_retries=0
            )
            try:
                wrong.messages.create(model=model, max_tokens=4, messages=messages)
            except anthropic.AuthenticationError as err:
                assert err.status_code == 401, err
                assert err.body["error"]["type"] == "authentication_error", err.body
            else:
                raise AssertionError("no error")

    @check("the node still serves after the errors")
    def _():
        msg = client.messages.create(model=model, max_tokens=2, messages=messages)
        assert msg.type == "message", msg

    return checks.exit_code('anthropic client')


if __name__ == "__main__":
    sys.exit(main())
