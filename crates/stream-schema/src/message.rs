//! What a chat request carries to the upstream besides its ids: the conversation (every role,
//! text or content parts, tool calls and tool results) and the options a chat API accepts
//! (tools, `tool_choice`, `response_format`, sampling). These travel inside a [`crate::Job`]
//! as JSON in OpenAI's shape, so a request reaches any upstream unchanged in meaning.
//!
//! Field names are OpenAI's (`tool_calls`, `tool_call_id`, `image_url`, `json_schema`); the
//! camelCase spellings are accepted as aliases, since the bridge's own API is camelCase.
//!
//! The types check shape only (what serde can tell; fields they do not know, such as the
//! `refusal: null` of an assistant message copied from a response, are ignored); the gateway
//! applies the limits and the rules across fields ([`ChatMessage::check`],
//! [`ChatOptions::check`]).

use serde::{Deserialize, Serialize};

use crate::codec::string_enum;

string_enum! {
    /// Author of a chat message.
    pub enum Role {
        System = "system",
        User = "user",
        Assistant = "assistant",
        /// The result of a tool call, sent back to the model (`tool_call_id` says which).
        Tool = "tool",
    }
}

string_enum! {
    /// How closely a vision model looks at an image (OpenAI's `image_url.detail`).
    pub enum ImageDetail {
        Auto = "auto",
        Low = "low",
        High = "high",
        Original = "original",
    }
}

string_enum! {
    /// The kind of a tool; chat APIs define functions only.
    pub enum ToolType {
        Function = "function",
    }
}

string_enum! {
    /// `tool_choice` as a word.
    pub enum ToolChoiceMode {
        None = "none",
        Auto = "auto",
        Required = "required",
    }
}

/// One message of the conversation sent upstream, in OpenAI's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct ChatMessage {
    pub role: Role,
    /// Text, or content parts; may be absent only on an assistant message with `tool_calls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<MessageContent>,
    /// The calls an assistant message made (assistant messages only).
    #[serde(default, skip_serializing_if = "Vec::is_empty", alias = "toolCalls")]
    pub tool_calls: Vec<ToolCall>,
    /// Which call a `tool` message answers (required on, and only on, `tool` messages).
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "toolCallId")]
    pub tool_call_id: Option<String>,
    /// An optional participant name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A message's content: a string, or parts (text and images) passed through as given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text {
        text: String,
    },
    #[serde(alias = "imageUrl")]
    ImageUrl {
        #[serde(alias = "imageUrl")]
        image_url: ImageUrl,
    },
}

/// An image as a URL (`https:` or a `data:` URL).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct ImageUrl {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<ImageDetail>,
}

/// A call an assistant message made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: ToolType,
    pub function: FunctionCall,
}

/// The function a call names and its arguments (a JSON text, as the model wrote it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: ToolType,
    pub function: FunctionDefinition,
}

/// A function tool: its name, what it does, and its parameters as a JSON Schema object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct FunctionDefinition {
    /// 1–64 chars of `[A-Za-z0-9_-]`.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON Schema object, passed through as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "utoipa", schema(value_type = Option<Object>))]
    pub parameters: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// Which tool the model must (or must not) call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[serde(untagged)]
pub enum ToolChoice {
    /// `"none"`, `"auto"` or `"required"`.
    Mode(ToolChoiceMode),
    /// `{"type": "function", "function": {"name": …}}`: this function.
    Function(NamedToolChoice),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct NamedToolChoice {
    #[serde(rename = "type")]
    pub kind: ToolType,
    pub function: FunctionName,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct FunctionName {
    pub name: String,
}

/// The form of the answer: text, any JSON object, or JSON matching a schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    #[serde(alias = "jsonObject")]
    JsonObject,
    #[serde(alias = "jsonSchema")]
    JsonSchema {
        #[serde(alias = "jsonSchema")]
        json_schema: JsonSchemaFormat,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct JsonSchemaFormat {
    /// 1–64 chars of `[A-Za-z0-9_-]`.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The JSON Schema the answer must match, passed through as given.
    #[cfg_attr(feature = "utoipa", schema(value_type = Object))]
    pub schema: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `stop` as a chat API accepts it: one sequence or a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(one) => vec![one],
            Self::Many(many) => many,
        }
    }
}

/// What the upstream gets besides the messages, `max_tokens` and `temperature`. Empty by
/// default; a job with any of it set is written as schema version 2.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatOptions {
    pub tools: Vec<Tool>,
    pub tool_choice: Option<ToolChoice>,
    pub response_format: Option<ResponseFormat>,
    pub top_p: Option<f32>,
    pub stop: Vec<String>,
    pub seed: Option<i64>,
}

impl ChatOptions {
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// Longest function, tool and schema name chat APIs accept.
pub const MAX_NAME_LEN: usize = 64;
/// Most stop sequences chat APIs accept.
pub const MAX_STOP_SEQUENCES: usize = 4;

/// Why a message or the options are refused (the gateway answers `400 invalid_request`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidChat(pub String);

fn invalid(message: impl Into<String>) -> InvalidChat {
    InvalidChat(message.into())
}

/// 1–64 chars of `[A-Za-z0-9_-]`, the names chat APIs accept for functions and schemas.
fn check_name(what: &str, name: &str) -> Result<(), InvalidChat> {
    let ok = (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what} `{}` must be 1-{MAX_NAME_LEN} characters of A-Z, a-z, 0-9, _ and -",
            name.chars().take(MAX_NAME_LEN).collect::<String>()
        )))
    }
}

impl ChatMessage {
    /// A message of plain text.
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Self {
            role,
            content: Some(MessageContent::Text(text.into())),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        }
    }

    /// The message's text: its string, or its text parts joined (images left out).
    pub fn text_content(&self) -> String {
        match &self.content {
            None => String::new(),
            Some(MessageContent::Text(text)) => text.clone(),
            Some(MessageContent::Parts(parts)) => parts
                .iter()
                .filter_map(|part| match part {
                    ContentPart::Text { text } => Some(text.as_str()),
                    ContentPart::ImageUrl { .. } => None,
                })
                .collect(),
        }
    }

    /// Bytes of everything the message says: text, image URLs, tool calls, ids and name (what
    /// the prompt limit counts).
    pub fn size(&self) -> usize {
        let content = match &self.content {
            None => 0,
            Some(MessageContent::Text(text)) => text.len(),
            Some(MessageContent::Parts(parts)) => parts
                .iter()
                .map(|part| match part {
                    ContentPart::Text { text } => text.len(),
                    ContentPart::ImageUrl { image_url } => image_url.url.len(),
                })
                .sum(),
        };
        let calls: usize = self
            .tool_calls
            .iter()
            .map(|c| c.id.len() + c.function.name.len() + c.function.arguments.len())
            .sum();
        content
            + calls
            + self.tool_call_id.as_ref().map_or(0, String::len)
            + self.name.as_ref().map_or(0, String::len)
    }

    /// Whether the message says anything: non-blank text, an image, or a tool call.
    pub fn is_blank(&self) -> bool {
        let has_image = matches!(&self.content, Some(MessageContent::Parts(parts))
            if parts.iter().any(|p| matches!(p, ContentPart::ImageUrl { .. })));
        self.tool_calls.is_empty() && !has_image && self.text_content().trim().is_empty()
    }

    /// Whether a version-1 reader (text messages of three roles) would misread this message.
    pub(crate) fn needs_v2(&self) -> bool {
        self.role == Role::Tool
            || !matches!(self.content, Some(MessageContent::Text(_)))
            || !self.tool_calls.is_empty()
            || self.tool_call_id.is_some()
            || self.name.is_some()
    }

    /// The rules across fields that serde cannot check: `tool_call_id` on and only on `tool`
    /// messages, `tool_calls` only on assistant messages, content present unless an assistant
    /// message calls tools, images only in user messages, valid call names.
    pub fn check(&self) -> Result<(), InvalidChat> {
        match (self.role, &self.tool_call_id) {
            (Role::Tool, None) => return Err(invalid("a tool message needs tool_call_id")),
            (Role::Tool, Some(id)) if id.is_empty() => {
                return Err(invalid("tool_call_id must not be empty"));
            }
            (Role::Tool, Some(_)) | (_, None) => {}
            (role, Some(_)) => {
                return Err(invalid(format!(
                    "tool_call_id belongs on tool messages, not {role} messages"
                )));
            }
        }
        if !self.tool_calls.is_empty() && self.role != Role::Assistant {
            return Err(invalid(format!(
                "tool_calls belong on assistant messages, not {} messages",
                self.role
            )));
        }
        if self.content.is_none() && self.tool_calls.is_empty() {
            return Err(invalid(format!(
                "{} messages need content (only assistant messages with tool_calls may omit it)",
                self.role
            )));
        }
        if let Some(MessageContent::Parts(parts)) = &self.content {
            if parts.is_empty() {
                return Err(invalid("content parts must not be empty"));
            }
            let images = parts
                .iter()
                .any(|p| matches!(p, ContentPart::ImageUrl { .. }));
            if images && self.role != Role::User {
                return Err(invalid(format!(
                    "image_url parts belong in user messages, not {} messages",
                    self.role
                )));
            }
        }
        for call in &self.tool_calls {
            if call.id.is_empty() {
                return Err(invalid("a tool call needs an id"));
            }
            check_name("tool call function name", &call.function.name)?;
        }
        Ok(())
    }
}

impl ChatOptions {
    /// The rules across fields: valid and distinct tool names, a `tool_choice` that names a
    /// declared tool (and needs tools unless it is `none`), a valid schema name, `top_p` in
    /// 0..=1, at most four non-empty stop sequences.
    pub fn check(&self) -> Result<(), InvalidChat> {
        let mut names = std::collections::HashSet::new();
        for tool in &self.tools {
            check_name("tool name", &tool.function.name)?;
            if !names.insert(tool.function.name.as_str()) {
                return Err(invalid(format!(
                    "tool `{}` is declared twice",
                    tool.function.name
                )));
            }
        }
        match &self.tool_choice {
            None | Some(ToolChoice::Mode(ToolChoiceMode::None)) => {}
            Some(_) if self.tools.is_empty() => {
                return Err(invalid("tool_choice needs tools"));
            }
            Some(ToolChoice::Function(named)) if !names.contains(named.function.name.as_str()) => {
                return Err(invalid(format!(
                    "tool_choice names `{}`, which is not among tools",
                    named
                        .function
                        .name
                        .chars()
                        .take(MAX_NAME_LEN)
                        .collect::<String>()
                )));
            }
            Some(_) => {}
        }
        if let Some(ResponseFormat::JsonSchema { json_schema }) = &self.response_format {
            check_name("response_format.json_schema.name", &json_schema.name)?;
        }
        if let Some(top_p) = self.top_p
            && !(0.0..=1.0).contains(&top_p)
        {
            return Err(invalid("topP must be between 0 and 1"));
        }
        if self.stop.len() > MAX_STOP_SEQUENCES {
            return Err(invalid(format!(
                "at most {MAX_STOP_SEQUENCES} stop sequences"
            )));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(invalid("stop sequences must not be empty"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(json: serde_json::Value) -> Result<ChatMessage, serde_json::Error> {
        serde_json::from_value(json)
    }

    #[test]
    fn openai_messages_of_every_role_parse_and_serialize_back_unchanged()
    -> Result<(), Box<dyn std::error::Error>> {
        let conversation = serde_json::json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO", "detail": "low"}},
            ]},
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "look", "arguments": "{\"x\":1}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
            {"role": "assistant", "content": "A cat.", "name": "bot"},
        ]);
        let messages: Vec<ChatMessage> = serde_json::from_value(conversation.clone())?;
        for m in &messages {
            m.check()?;
        }
        assert_eq!(serde_json::to_value(&messages)?, conversation);
        assert_eq!(messages[1].text_content(), "What is this?");
        assert!(!messages[2].is_blank());
        Ok(())
    }

    #[test]
    fn shapes_serde_refuses() {
        assert!(message(serde_json::json!({"role": "robot", "content": "x"})).is_err());
        assert!(
            message(serde_json::json!({"role": "user", "content": [{"type": "input_audio"}]}))
                .is_err()
        );
    }

    #[test]
    fn rules_across_fields() -> Result<(), serde_json::Error> {
        let refused = |json| message(json).map(|m| m.check().is_err());
        assert!(refused(
            serde_json::json!({"role": "tool", "content": "x"})
        )?);
        assert!(refused(
            serde_json::json!({"role": "user", "content": "x", "tool_call_id": "c"})
        )?);
        assert!(refused(serde_json::json!({"role": "user"}))?);
        assert!(refused(serde_json::json!({"role": "system", "content": [
            {"type": "image_url", "image_url": {"url": "u"}}]}))?);
        assert!(refused(
            serde_json::json!({"role": "user", "content": "x", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]})
        )?);
        Ok(())
    }

    #[test]
    fn options_rules() {
        let tool = |name: &str| Tool {
            kind: ToolType::Function,
            function: FunctionDefinition {
                name: name.to_owned(),
                description: None,
                parameters: None,
                strict: None,
            },
        };
        let named = |name: &str| {
            Some(ToolChoice::Function(NamedToolChoice {
                kind: ToolType::Function,
                function: FunctionName {
                    name: name.to_owned(),
                },
            }))
        };
        let ok = ChatOptions {
            tools: vec![tool("get_weather"), tool("b-2")],
            tool_choice: named("b-2"),
            stop: vec!["END".to_owned()],
            top_p: Some(0.5),
            ..ChatOptions::default()
        };
        assert_eq!(ok.check(), Ok(()));
        for bad in [
            ChatOptions {
                tools: vec![tool("has space")],
                ..ChatOptions::default()
            },
            ChatOptions {
                tools: vec![tool("f"), tool("f")],
                ..ChatOptions::default()
            },
            ChatOptions {
                tool_choice: named("missing"),
                ..ok.clone()
            },
            ChatOptions {
                tool_choice: Some(ToolChoice::Mode(ToolChoiceMode::Required)),
                ..ChatOptions::default()
            },
            ChatOptions {
                top_p: Some(1.5),
                ..ChatOptions::default()
            },
            ChatOptions {
                stop: vec!["a".to_owned(); 5],
                ..ChatOptions::default()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }
}
