// Drives a running Canopy node with the official `openai` Node client (npm).
//
// Usage: node openai_client.cjs --base-url http://127.0.0.1:PORT/v1 --model MODEL
//
// Checks what the client library sees: a chat completion, a stream (deltas joined, finish
// reason, usage chunk), logprobs, `n` choices, structured output (`response_format` with a
// JSON schema: the reply validates), a tool call with `tool_choice: "required"` (the
// arguments validate), a legacy completion, and the typed errors for an unknown model
// (NotFoundError) and bad parameters (BadRequestError). Prints one line per check and exits
// non-zero if any check failed. Started by tests/api_compat.rs, which starts the node and
// installs the client under target/.

// CommonJS, so that NODE_PATH (the install under target/) resolves the package.
const { OpenAI } = require("openai");

function arg(name) {
  const i = process.argv.indexOf(name);
  if (i < 0 || i + 1 >= process.argv.length) throw new Error(`missing ${name}`);
  return process.argv[i + 1];
}

const client = new OpenAI({
  baseURL: arg("--base-url"),
  apiKey: "not-needed",
  maxRetries: 0,
  timeout: 120_000,
});
const model = arg("--model");
const params = {
  model,
  messages: [{ role: "user", content: "What is 2+2? Reply with just the number." }],
  max_tokens: 24,
  temperature: 0,
  seed: 42,
};
const failed = [];

function assert(condition, what) {
  if (!condition) throw new Error(`assertion failed: ${what}`);
}

async function check(name, body) {
  try {
    await body();
    console.log(`ok   ${name}`);
  } catch (err) {
    console.log(`FAIL ${name}: ${err && err.stack ? err.stack : err}`);
    failed.push(name);
  }
}

async function main() {
  let plain = null;

  await check("chat.completions.create", async () => {
    const resp = await client.chat.completions.create(params);
    const choice = resp.choices[0];
    assert(resp.object === "chat.completion", resp.object);
    assert(typeof choice.message.content === "string" && choice.message.content.length > 0, "content");
    assert(["stop", "length"].includes(choice.finish_reason), choice.finish_reason);
    assert(resp.usage.prompt_tokens > 0 && resp.usage.completion_tokens > 0, "usage");
    plain = choice.message.content;
  });

  await check("a stream joins to the plain answer, with a usage chunk", async () => {
    const stream = await client.chat.completions.create({
      ...params,
      stream: true,
      stream_options: { include_usage: true },
    });
    let text = "";
    let finish = null;
    let usage = null;
    for await (const chunk of stream) {
      for (const choice of chunk.choices) {
        text += choice.delta.content ?? "";
        finish = choice.finish_reason ?? finish;
      }
      usage = chunk.usage ?? usage;
    }
    assert(text === plain, `${JSON.stringify(text)} vs ${JSON.stringify(plain)}`);
    assert(finish !== null, "a finish reason");
    assert(usage && usage.completion_tokens > 0, "usage");
  });

  await check("logprobs with top_logprobs", async () => {
    const resp = await client.chat.completions.create({ ...params, logprobs: true, top_logprobs: 2 });
    const content = resp.choices[0].logprobs.content;
    assert(content.length > 0, "entries");
    for (const entry of content) {
      assert(entry.logprob <= 0, entry.logprob);
      assert(entry.top_logprobs.length <= 2, entry.top_logprobs.length);
    }
  });

  await check("n=2 gives two choices", async () => {
    const resp = await client.chat.completions.create({ ...params, n: 2, temperature: 0.8 });
    assert(resp.choices.length === 2, resp.choices.length);
    assert(resp.choices[1].index === 1, resp.choices[1].index);
  });

  await check("response_format json_schema: the reply validates", async () => {
    const resp = await client.chat.completions.create({
      ...params,
      max_tokens: 64,
      response_format: {
        type: "json_schema",
        json_schema: {
          name: "sum",
          strict: true,
          schema: {
            type: "object",
            properties: { answer: { type: "integer" } },
            required: ["answer"],
            additionalProperties: false,
          },
        },
      },
    });
    const value = JSON.parse(resp.choices[0].message.content);
    assert(Number.isInteger(value.answer) && Object.keys(value).length === 1, JSON.stringify(value));
  });

  await check("tool_choice required: one call whose arguments validate", async () => {
    const resp = await client.chat.completions.create({
      ...params,
      max_tokens: 96,
      messages: [{ role: "user", content: "What is the weather in Paris?" }],
      tools: [
        {
          type: "function",
          function: {
            name: "get_weather",
            description: "The current weather in a city.",
            parameters: {
              type: "object",
              properties: { city: { type: "string", maxLength: 40 } },
              required: ["city"],
              additionalProperties: false,
            },
          },
        },
      ],
      tool_choice: "required",
    });
    const choice = resp.choices[0];
    assert(choice.finish_reason === "tool_calls", choice.finish_reason);
    assert(choice.message.tool_calls.length === 1, "one call");
    const call = choice.message.tool_calls[0];
    assert(call.function.name === "get_weather", call.function.name);
    const args = JSON.parse(call.function.arguments);
    assert(typeof args.city === "string" && Object.keys(args).length === 1, JSON.stringify(args));
  });

  await check("completions.create (legacy)", async () => {
    const resp = await client.completions.create({
      model,
      prompt: "The capital of France is",
      max_tokens: 8,
      temperature: 0,
    });
    assert(resp.object === "text_completion", resp.object);
    assert(typeof resp.choices[0].text === "string", "text");
  });

  await check("unknown model raises NotFoundError", async () => {
    try {
      await client.chat.completions.create({ ...params, model: "no-such-model" });
    } catch (err) {
      assert(err instanceof OpenAI.NotFoundError, err);
      assert(err.status === 404, err.status);
      return;
    }
    throw new Error("no error");
  });

  await check("temperature=5 raises BadRequestError naming it", async () => {
    try {
      await client.chat.completions.create({ ...params, temperature: 5 });
    } catch (err) {
      assert(err instanceof OpenAI.BadRequestError, err);
      assert(err.param === "temperature" || String(err).includes("temperature"), err);
      return;
    }
    throw new Error("no error");
  });

  if (failed.length > 0) {
    console.log(`openai node client: ${failed.length} check(s) failed: ${JSON.stringify(failed)}`);
    process.exit(1);
  }
  console.log("openai node client: every check passed");
}

main().catch((err) => {
  console.log(`FAIL the checks did not run: ${err && err.stack ? err.stack : err}`);
  process.exit(1);
});
