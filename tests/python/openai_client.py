"""Drives a running Canopy node with the official `openai` Python client.

Usage: python openai_client.py --base-url http://127.0.0.1:PORT/v1 --model MODEL

Checks that what the client library sees is what OpenAI's API would give it: the model list,
a plain chat completion, a streamed one (deltas joined, finish reason, usage chunk), and the
typed errors the client raises for an unknown model (NotFoundError) and for bad parameters
(BadRequestError). Prints one line per check and exits non-zero if any check failed.
Started by tests/node_model.rs, which starts the node and installs the client in a venv.
"""

import argparse
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
        ("n=2", {"n": 2}, "n"),
        ("no messages", {"messages": []}, "messages"),
        ("unknown role", {"messages": [{"role": "wizard", "content": "x"}]}, "role"),
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
