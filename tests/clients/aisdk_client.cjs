// Drives the gateway's /api/chat with the published `ai` package (e2e test `aisdk::`): its
// `DefaultChatTransport` sends messages and reconnects, `readUIMessageStream` builds the UI
// message from the parts (validating each against the package's own schema). Environment:
// GATEWAY, API_KEY, MODEL, TEXT_PROMPT, TOOLS_PROMPT, SLOW_PROMPT, CHAT_PREFIX. Prints one
// JSON object. CommonJS, so that NODE_PATH finds the packages scripts/sdk-clients.sh installed.
const { DefaultChatTransport, readUIMessageStream } = require("ai");

const env = process.env;
const transport = (apiKey) =>
  new DefaultChatTransport({
    api: `${env.GATEWAY}/api/chat`,
    headers: { Authorization: `Bearer ${apiKey}` },
    body: { model: env.MODEL },
  });
const client = transport(env.API_KEY);
const userMessage = (text) => [{ id: "u1", role: "user", parts: [{ type: "text", text }] }];

// Reads chunks until the end, or until `stopWhen(chunks)` says so (then the connection closes).
async function collect(stream, stopWhen) {
  const chunks = [];
  const reader = stream.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    if (stopWhen && (await stopWhen(chunks))) {
      await reader.cancel();
      break;
    }
  }
  return chunks;
}

// The UI message the package builds from the chunks, summarized.
async function summary(chunks) {
  const stream = new ReadableStream({
    start(controller) {
      for (const chunk of chunks) controller.enqueue(chunk);
      controller.close();
    },
  });
  let message;
  for await (const snapshot of readUIMessageStream({ stream })) message = snapshot;
  const parts = message ? message.parts : [];
  return {
    id: message ? message.id : null,
    text: parts.filter((p) => p.type === "text").map((p) => p.text).join(""),
    textParts: parts.filter((p) => p.type === "text").length,
    reasoning: parts.filter((p) => p.type === "reasoning").map((p) => p.text).join(""),
    tools: parts
      .filter((p) => p.type.startsWith("tool-"))
      .map((p) => ({ id: p.toolCallId, name: p.type.slice(5), input: p.input, state: p.state })),
    types: chunks.map((c) => c.type),
  };
}

const send = (chatId, prompt, via = client) =>
  via.sendMessages({ chatId, messages: userMessage(prompt), trigger: "submit-message", messageId: undefined });

async function refusal(make) {
  try {
    await make();
  } catch (error) {
    return String(error.message);
  }
  return "no error";
}

(async () => {
  const p = env.CHAT_PREFIX;
  const text = await summary(await collect(await send(`${p}-text`, env.TEXT_PROMPT)));
  const tools = await summary(await collect(await send(`${p}-tools`, env.TOOLS_PROMPT)));

  // A reload mid-answer: the first connection drops after a few text deltas, the transport
  // reconnects to /api/chat/{id}/stream and gets the whole answer from its start.
  const resumeId = `${p}-resume`;
  const head = await collect(await send(resumeId, env.SLOW_PROMPT), (chunks) =>
    chunks.filter((c) => c.type === "text-delta").length >= 3);
  const resumedStream = await client.reconnectToStream({ chatId: resumeId });
  const resumed = resumedStream ? await summary(await collect(resumedStream)) : null;
  const afterEnd = await client.reconnectToStream({ chatId: resumeId });

  // Stop mid-answer: the stream ends with `abort`.
  const stopId = `${p}-stop`;
  let stopStatus = null;
  const stopped = await collect(await send(stopId, env.SLOW_PROMPT), async (chunks) => {
    if (stopStatus === null && chunks.some((c) => c.type === "text-delta")) {
      const response = await fetch(`${env.GATEWAY}/api/chat/${stopId}/stop`, {
        method: "POST",
        headers: { Authorization: `Bearer ${env.API_KEY}` },
      });
      stopStatus = response.status;
    }
    return false;
  });

  const out = {
    text,
    tools,
    head: head.map((c) => c.type),
    resumed,
    afterEnd: afterEnd === null ? "none" : "stream",
    stopStatus,
    stopped: stopped.map((c) => c.type),
    unauthorized: await refusal(() => send(`${p}-denied`, "hi", transport("sk-wrong"))),
    unauthorizedResume: await refusal(() =>
      transport("sk-wrong").reconnectToStream({ chatId: resumeId })),
  };
  console.log(JSON.stringify(out));
})().catch((error) => {
  console.error(error);
  process.exit(1);
});
