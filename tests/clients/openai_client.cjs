// Drives the gateway with the official `openai` npm package (e2e test `openai_sdk::`). Same
// environment and output as openai_client.py. CommonJS, so that NODE_PATH finds the packages
// that scripts/sdk-clients.sh installed.
const OpenAI = require("openai");

const env = process.env;
const client = new OpenAI({ baseURL: env.BASE_URL, apiKey: env.API_KEY, maxRetries: 0 });
const messages = (prompt) => [{ role: "user", content: prompt }];

async function streamed(prompt) {
  let content = "", reasoning = "", finish = null, usage = null;
  const calls = {}, ids = new Set();
  const stream = await client.chat.completions.create({
    model: env.MODEL, messages: messages(prompt), stream: true,
    stream_options: { include_usage: true },
  });
  for await (const chunk of stream) {
    ids.add(chunk.id);
    if (chunk.usage) usage = chunk.usage.completion_tokens;
    for (const choice of chunk.choices) {
      const delta = choice.delta;
      content += delta.content ?? "";
      reasoning += delta.reasoning_content ?? "";
      for (const call of delta.tool_calls ?? []) {
        const slot = (calls[call.index] ??= { id: "", name: "", arguments: "" });
        slot.id += call.id ?? "";
        slot.name += call.function?.name ?? "";
        slot.arguments += call.function?.arguments ?? "";
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  }
  const order = Object.keys(calls).map(Number).sort((a, b) => a - b);
  return { content, reasoning, calls: order.map((i) => calls[i]), finish, usage, ids: [...ids].sort() };
}

async function whole(prompt) {
  const completion = await client.chat.completions.create({ model: env.MODEL, messages: messages(prompt) });
  const message = completion.choices[0].message;
  return {
    content: message.content ?? "",
    reasoning: message.reasoning_content ?? "",
    calls: (message.tool_calls ?? []).map((c) => ({ id: c.id, name: c.function.name, arguments: c.function.arguments })),
    finish: completion.choices[0].finish_reason,
    usage: completion.usage.completion_tokens,
  };
}

async function refusal(make) {
  try {
    await make();
  } catch (error) {
    if (error instanceof OpenAI.APIError) return error.constructor.name;
    throw error;
  }
  return "no error";
}

const create = (apiKey, model) => () =>
  new OpenAI({ baseURL: env.BASE_URL, apiKey, maxRetries: 0 }).chat.completions.create({ model, messages: messages("hi") });

async function rateLimited() {
  const first = await refusal(create(env.LIMITED_KEY, env.MODEL));
  return first === "no error" ? refusal(create(env.LIMITED_KEY, env.MODEL)) : first;
}

(async () => {
  const models = [];
  for await (const model of client.models.list()) models.push(model.id);
  const out = {
    text: await streamed(env.TEXT_PROMPT),
    tools: await streamed(env.TOOLS_PROMPT),
    whole_text: await whole(env.TEXT_PROMPT),
    whole_tools: await whole(env.TOOLS_PROMPT),
    models,
    unauthorized: await refusal(create("sk-wrong", env.MODEL)),
    unknown_model: await refusal(create(env.API_KEY, "no-such-model")),
    rate_limited: await rateLimited(),
  };
  console.log(JSON.stringify(out));
})().catch((error) => {
  console.error(error);
  process.exit(1);
});
