// The README's `useChat` snippet ("### AI SDK (`useChat`)"), run for real: the e2e test
// browser::the_usechat_app_resumes_after_a_reload_and_stops_in_chromium loads this app in
// Chromium from another origin than the gateway. Settings come from the query string
// (`gateway`, `key`, `chat`, `model`); the chat id is kept in localStorage so that a reload
// resumes the same chat, and the key in sessionStorage (like the demo page, never in
// localStorage).
import { useState } from "react";
import { createRoot } from "react-dom/client";
import { useChat } from "@ai-sdk/react";
import { DefaultChatTransport } from "ai";

const query = new URLSearchParams(location.search);
function setting(name, storage, fallback) {
  const value = query.get(name) ?? storage.getItem(`usechat.${name}`) ?? fallback;
  if (value != null) storage.setItem(`usechat.${name}`, value);
  return value;
}
const gateway = setting("gateway", localStorage, "http://127.0.0.1:8080");
const apiKey = setting("key", sessionStorage, "");
const chatId = setting("chat", localStorage, crypto.randomUUID());
const model = query.get("model") ?? undefined;
const api = `${gateway}/api/chat`;
const headers = { Authorization: `Bearer ${apiKey}` };

function App() {
  const { messages, sendMessage, status, error } = useChat({
    id: chatId, // kept (localStorage) to resume after a reload
    resume: true, // on mount: GET /api/chat/{id}/stream
    transport: new DefaultChatTransport({
      api,
      headers, // sent on the reconnect too
      body: { model }, // optional, e.g. "gpt-4": else gateway.default_model
    }),
  });
  const [input, setInput] = useState("");
  const [stopped, setStopped] = useState(null);

  const send = (event) => {
    event.preventDefault();
    if (!input.trim()) return;
    sendMessage({ text: input });
    setInput("");
  };
  // Stop for everyone (the producer stops): the open stream then ends with an `abort` part.
  const stop = async () => {
    const response = await fetch(`${api}/${chatId}/stop`, { method: "POST", headers });
    setStopped(response.status);
  };

  return (
    <main>
      <h1>useChat</h1>
      <p>
        chat <code id="chat">{chatId}</code> · status{" "}
        <span id="status" data-status={status}>
          {status}
        </span>
        {stopped != null && (
          <span id="stopped" data-status={stopped}>
            {" "}
            · stop answered {stopped}
          </span>
        )}
      </p>
      <section id="transcript">
        {messages.map((message) => (
          <article key={message.id} className={message.role} data-id={message.id}>
            <b>{message.role}</b>
            <div className="text">
              {message.parts
                .filter((part) => part.type === "text")
                .map((part) => part.text)
                .join("")}
            </div>
          </article>
        ))}
      </section>
      {error && <p id="error">{String(error.message ?? error)}</p>}
      <form onSubmit={send}>
        <input
          id="prompt"
          value={input}
          onChange={(event) => setInput(event.target.value)}
          placeholder="Say something"
        />
        <button id="send" type="submit" disabled={status !== "ready" && status !== "error"}>
          Send
        </button>
        <button
          id="stop"
          type="button"
          onClick={stop}
          disabled={status !== "submitted" && status !== "streaming"}
        >
          Stop
        </button>
      </form>
    </main>
  );
}

createRoot(document.getElementById("root")).render(<App />);
