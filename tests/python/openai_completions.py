"""Drives a running Canopy node's legacy completions (`/v1/completions`) with the official
`openai` Python client.

Usage: python openai_completions.py --base-url http://127.0.0.1:PORT/v1 --model MODEL

Checks a plain completion (raw prompt, no chat template), a streamed one (pieces joined, one
finish reason, the usage chunk), `echo`, a list of prompts (one choice each, by index),
`logprobs` in the legacy shape, `n` choices per prompt, and the BadRequestError the client
raises for a refused field (`suffix`, `best_of`). Prints one line
per check and exits non-zero if any check failed. Started by tests/api_compat.rs, which starts
the node and installs the client in a venv.
"""

import argparse
import sys
from checks import Checks

import openai

PROMPT = "The capital of France is"


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

    params = dict(model=model, prompt=PROMPT, max_tokens=8, temperature=0, seed=7)
    plain = {}

    @check("completions.create")
    def _():
        resp = client.completions.create(**params)
        assert resp.object == "text_completion", resp
        assert resp.id.startswith("cmpl-"), resp
        assert resp.model == model, resp
        assert len(resp.choices) == 1, resp
        choice = resp.choices[0]
        assert choice.index == 0, choice
        assert choice.text.strip(), f"empty text: {resp}"
        assert choice.finish_reason in ("stop", "length"), choice
        usage = resp.usage
        # The raw prompt: a handful of tokens, no chat template around it.
        assert 0 < usage.prompt_tokens < 12, usage
        assert 0 < usage.completion_tokens <= 8, usage
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, usage
        plain["text"] = choice.text
        plain["usage"] = usage
        print(f"     text: {choice.text!r}", flush=True)

    @check("completions.create(stream=True)")
    def _():
        stream = client.completions.create(
            **params, stream=True, stream_options={"include_usage": True}
        )
        pieces, finishes, usage, ids = [], [], None, set()
        for chunk in stream:
            assert chunk.object == "text_completion", chunk
            ids.add(chunk.id)
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                assert choice.index == 0, choice
                pieces.append(choice.text)
                if choice.finish_reason:
                    finishes.append(choice.finish_reason)
        text = "".join(pieces)
        assert len(ids) == 1, ids
        assert len(finishes) == 1 and finishes[0] in ("stop", "length"), finishes
        assert usage is not None and usage.completion_tokens > 0, usage
        print(f"     streamed: {text!r}", flush=True)
        if "text" in plain:
            assert text == plain["text"], (text, plain["text"])
            assert usage.completion_tokens == plain["usage"].completion_tokens, usage

    @check("echo=True prepends the prompt")
    def _():
        resp = client.completions.create(**params, echo=True)
        text = resp.choices[0].text
        assert text.startswith(PROMPT), text
        if "text" in plain:
            assert text == PROMPT + plain["text"], text

    @check("a list of prompts gives one choice each")
    def _():
        resp = client.completions.create(**{**params, "prompt": [PROMPT, "One, two, three,"]})
        assert [c.index for c in resp.choices] == [0, 1], resp
        assert all(c.text for c in resp.choices), resp
        if "text" in plain:
            assert resp.choices[0].text == plain["text"], resp.choices[0].text
            assert resp.usage.completion_tokens >= plain["usage"].completion_tokens, resp.usage

    @check("logprobs=2 in the legacy shape")
    def _():
        resp = client.completions.create(**params, logprobs=2)
        choice = resp.choices[0]
        lp = choice.logprobs
        n = resp.usage.completion_tokens
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n, lp
        assert "".join(lp.tokens) == choice.text, (lp.tokens, choice.text)
        offsets = [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
        assert lp.text_offset == offsets, (lp.text_offset, offsets)
        for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
            assert 1 <= len(top) <= 2, top
            assert abs(chosen - max(top.values())) < 1e-6, (chosen, top)
        if "text" in plain:
            assert choice.text == plain["text"], choice.text

    @check("n=2 per prompt, numbered prompt-major")
    def _():
        resp = client.completions.create(
            **{**params, "prompt": [PROMPT, "One, two, three,"], "n": 2}
        )
        assert [c.index for c in resp.choices] == [0, 1, 2, 3], resp
        # Greedy: a prompt's two choices agree.
        assert resp.choices[0].text == resp.choices[1].text, resp
        assert resp.choices[2].text == resp.choices[3].text, resp
        if "text" in plain:
            assert resp.choices[0].text == plain["text"], resp.choices[0].text
            single = client.completions.create(**{**params, "prompt": "One, two, three,"})
            prompts = plain["usage"].prompt_tokens + single.usage.prompt_tokens
            assert resp.usage.prompt_tokens == prompts, (resp.usage, prompts)

    for name, extra, param in [
        ("suffix", {"suffix": " and that is all."}, "suffix"),
        ("best_of", {"best_of": 3}, "best_of"),
        ("logprobs with echo", {"logprobs": 1, "echo": True}, "echo"),
    ]:

        @check(f"{name} raises BadRequestError")
        def _(extra=extra, param=param):
            try:
                client.completions.create(**params, **extra)
            except openai.BadRequestError as err:
                assert err.status_code == 400, err
                body = err.body if isinstance(err.body, dict) else {}
                assert body.get("param") == param, (param, err.body)
            else:
                raise AssertionError("no error")

    @check("unknown model raises NotFoundError")
    def _():
        try:
            client.completions.create(**{**params, "model": "no-such-model"})
        except openai.NotFoundError as err:
            assert err.status_code == 404, err
        else:
            raise AssertionError("no error")

    return checks.exit_code('openai completions')


if __name__ == "__main__":
    sys.exit(main())
