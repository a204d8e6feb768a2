//! The body `useChat`'s default transport sends (`id`, `messages` as UI messages with
//! `parts`, `trigger`, `messageId`, plus the transport's `body` fields), as a
//! `POST /api/chat/start` body.
//!
//! UI messages become chat messages in OpenAI's shape: `text` parts are the content (images,
//! `file` parts with an `image/*` media type, become `image_url` parts of a user message);
//! `reasoning`, `source-*`, `data-*` and other file parts are not sent back to the model. An
//! assistant message's steps (split at `step-start`) each become one assistant message with
//! its text and tool calls (`tool-<name>` and `dynamic-tool` parts that have their input),
//! followed by one `tool` message per call that has an output (`output-available`) or failed
//! (`output-error`, its `errorText`).

use serde_json::{Map, Value, json};

use crate::error::ApiError;

/// The body fields passed on to the start body as they are (native and OpenAI spellings).
const PASSED: [&str; 12] = [
    "maxTokens",
    "max_tokens",
    "temperature",
    "tools",
    "toolChoice",
    "tool_choice",
    "responseFormat",
    "response_format",
    "topP",
    "top_p",
    "stop",
    "seed",
];

/// Turns a `useChat` body into a `/api/chat/start` body; the model is the body's `model`, else
/// `default_model`.
pub fn native_body(body: &[u8], default_model: Option<&str>) -> Result<Vec<u8>, ApiError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    let Value::Object(mut object) = value else {
        return Err(ApiError::InvalidRequest(
            "the body must be a JSON object".to_owned(),
        ));
    };
    let id = match object.remove("id") {
        Some(Value::String(id)) => id,
        Some(_) => return Err(ApiError::InvalidSessionId("id must be a string".to_owned())),
        None => return Err(ApiError::InvalidSessionId("id is required".to_owned())),
    };
    match object.get("trigger") {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if t == "submit-message" || t == "regenerate-message" => {}
        Some(_) => {
            return Err(ApiError::InvalidRequest(
                "trigger must be submit-message or regenerate-message".to_owned(),
            ));
        }
    }
    let model = match object.remove("model") {
        Some(Value::String(model)) => model,
        None | Some(Value::Null) => default_model
            .ok_or_else(|| ApiError::InvalidRequest("model is required".to_owned()))?
            .to_owned(),
        Some(_) => {
            return Err(ApiError::InvalidRequest(
                "model must be a string".to_owned(),
            ));
        }
    };
    let Some(Value::Array(ui)) = object.remove("messages") else {
        return Err(ApiError::InvalidRequest(
            "messages must be a list of UI messages".to_owned(),
        ));
    };
    let mut messages = Vec::new();
    for (i, message) in ui.iter().enumerate() {
        convert(message, &mut messages)
            .map_err(|e| ApiError::InvalidRequest(format!("messages[{i}]: {e}")))?;
    }
    let mut native = Map::new();
    native.insert("sessionId".to_owned(), Value::String(id));
    native.insert("modelId".to_owned(), Value::String(model));
    native.insert("messages".to_owned(), Value::Array(messages));
    for name in PASSED {
        if let Some(value) = object.remove(name) {
            native.insert(name.to_owned(), value);
        }
    }
    serde_json::to_vec(&Value::Object(native)).map_err(|_| ApiError::Internal)
}

/// The text of a part of type `text`.
fn text_of(part: &Value) -> Option<&str> {
    (part["type"] == "text").then(|| part["text"].as_str())?
}

/// Whether a part is a tool invocation: `tool-<name>` or `dynamic-tool`.
fn tool_name(part: &Value) -> Option<&str> {
    let kind = part["type"].as_str()?;
    if kind == "dynamic-tool" {
        return part["toolName"].as_str();
    }
    kind.strip_prefix("tool-")
}

/// Appends the chat messages of one UI message.
fn convert(message: &Value, out: &mut Vec<Value>) -> Result<(), String> {
    let role = message["role"]
        .as_str()
        .ok_or("role must be system, user or assistant")?;
    let parts = message["parts"].as_array().ok_or("parts must be a list")?;
    match role {
        "system" => {
            let text: String = parts.iter().filter_map(text_of).collect();
            out.push(json!({ "role": "system", "content": text }));
        }
        "user" => {
            let images: Vec<&str> = parts
                .iter()
                .filter(|p| {
                    p["type"] == "file"
                        && p["mediaType"]
                            .as_str()
                            .is_some_and(|m| m.starts_with("image/"))
                })
                .filter_map(|p| p["url"].as_str())
                .collect();
            if images.is_empty() {
                let text: String = parts.iter().filter_map(text_of).collect();
                out.push(json!({ "role": "user", "content": text }));
            } else {
                let mut content: Vec<Value> = parts
                    .iter()
                    .filter_map(text_of)
                    .map(|text| json!({ "type": "text", "text": text }))
                    .collect();
                content.extend(
                    images
                        .into_iter()
                        .map(|url| json!({ "type": "image_url", "image_url": { "url": url } })),
                );
                out.push(json!({ "role": "user", "content": content }));
            }
        }
        "assistant" => {
            for step in parts.split(|p| p["type"] == "step-start") {
                assistant_step(step, out);
            }
        }
        _ => return Err(format!("unknown role {role:?}")),
    }
    Ok(())
}

/// One step of an assistant message: its text and tool calls, then the calls' results.
fn assistant_step(parts: &[Value], out: &mut Vec<Value>) {
    let text: String = parts.iter().filter_map(text_of).collect();
    let mut calls = Vec::new();
    let mut results = Vec::new();
    for part in parts {
        let Some(name) = tool_name(part) else {
            continue;
        };
        let state = part["state"].as_str().unwrap_or_default();
        let Some(id) = part["toolCallId"].as_str() else {
            continue;
        };
        // A call still streaming its input was never complete: the model cannot be told it.
        if state == "input-streaming" {
            continue;
        }
        let arguments = match &part["input"] {
            Value::Null => "{}".to_owned(),
            input => input.to_string(),
        };
        calls.push(json!({
            "id": id, "type": "function",
            "function": { "name": name, "arguments": arguments },
        }));
        let result = match state {
            "output-available" => Some(match &part["output"] {
                Value::String(text) => text.clone(),
                output => output.to_string(),
            }),
            "output-error" => Some(part["errorText"].as_str().unwrap_or("error").to_owned()),
            _ => None,
        };
        if let Some(content) = result {
            results.push(json!({ "role": "tool", "tool_call_id": id, "content": content }));
        }
    }
    if text.is_empty() && calls.is_empty() {
        return;
    }
    let mut message = json!({ "role": "assistant" });
    if let Some(object) = message.as_object_mut() {
        if !text.is_empty() || calls.is_empty() {
            object.insert("content".to_owned(), json!(text));
        }
        if !calls.is_empty() {
            object.insert("tool_calls".to_owned(), Value::Array(calls));
        }
    }
    out.push(message);
    out.extend(results);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn native(body: Value) -> Result<Value, ApiError> {
        let bytes = native_body(body.to_string().as_bytes(), Some("mock"))?;
        serde_json::from_slice(&bytes).map_err(|_| ApiError::Internal)
    }

    #[test]
    fn a_use_chat_body_is_a_start_body() -> Result<(), ApiError> {
        let body = native(json!({
            "id": "chat-1", "trigger": "submit-message", "messageId": null,
            "temperature": 0.5, "sessionId": "other",
            "messages": [
                {"id": "s", "role": "system", "parts": [{"type": "text", "text": "be brief"}]},
                {"id": "u", "role": "user", "parts": [
                    {"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
            ],
        }))?;
        assert_eq!(body["sessionId"], "chat-1");
        assert_eq!(body["modelId"], "mock");
        assert_eq!(body["temperature"], 0.5);
        assert_eq!(
            body["messages"],
            json!([
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "Hello there"},
            ])
        );
        assert!(body.get("trigger").is_none());
        Ok(())
    }

    #[test]
    fn assistant_steps_become_messages_with_tool_calls_and_results() -> Result<(), ApiError> {
        let body = native(json!({
            "id": "c", "model": "gpt-4",
            "messages": [
                {"id": "u", "role": "user", "parts": [{"type": "text", "text": "weather?"}]},
                {"id": "a", "role": "assistant", "parts": [
                    {"type": "step-start"},
                    {"type": "reasoning", "text": "let me look"},
                    {"type": "text", "text": "Looking."},
                    {"type": "tool-weather", "toolCallId": "call_1", "state": "output-available",
                        "input": {"city": "Oslo"}, "output": {"temp": 3}},
                    {"type": "dynamic-tool", "toolName": "clock", "toolCallId": "call_2",
                        "state": "output-error", "input": {}, "errorText": "broken"},
                    {"type": "tool-skip", "toolCallId": "call_3", "state": "input-streaming"},
                    {"type": "step-start"},
                    {"type": "text", "text": "It is 3 degrees."},
                ]},
            ],
        }))?;
        assert_eq!(body["modelId"], "gpt-4");
        assert_eq!(
            body["messages"],
            json!([
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "Looking.", "tool_calls": [
                    {"id": "call_1", "type": "function",
                        "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}},
                    {"id": "call_2", "type": "function",
                        "function": {"name": "clock", "arguments": "{}"}},
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\":3}"},
                {"role": "tool", "tool_call_id": "call_2", "content": "broken"},
                {"role": "assistant", "content": "It is 3 degrees."},
            ])
        );
        Ok(())
    }

    #[test]
    fn user_images_become_image_url_parts() -> Result<(), ApiError> {
        let body = native(
            json!({"id": "c", "messages": [{"id": "u", "role": "user", "parts": [
                {"type": "text", "text": "what is it?"},
                {"type": "file", "mediaType": "image/png", "url": "data:image/png;base64,AA=="},
                {"type": "file", "mediaType": "text/plain", "url": "data:text/plain,x"},
            ]}]}),
        )?;
        assert_eq!(
            body["messages"][0]["content"],
            json!([
                {"type": "text", "text": "what is it?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
            ])
        );
        Ok(())
    }

    #[test]
    fn malformed_bodies_are_refused_by_name() {
        let err = |body: &str| native_body(body.as_bytes(), None).err().map(|e| e.code());
        assert_eq!(err("{"), Some("invalid_json"));
        assert_eq!(err("[]"), Some("invalid_request"));
        assert_eq!(err(r#"{"messages": []}"#), Some("invalid_session_id"));
        assert_eq!(
            err(r#"{"id": "c", "messages": []}"#),
            Some("invalid_request")
        );
        assert_eq!(
            err(r#"{"id": "c", "model": "m", "messages": {}}"#),
            Some("invalid_request")
        );
        assert_eq!(
            err(r#"{"id": "c", "model": "m", "trigger": "x", "messages": []}"#),
            Some("invalid_request")
        );
        assert_eq!(
            err(r#"{"id": "c", "model": "m", "messages": [{"role": "robot", "parts": []}]}"#),
            Some("invalid_request")
        );
    }
}
