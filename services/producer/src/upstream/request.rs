//! A job as an async-openai chat request: every message role, content parts, tool calls and
//! tool results, tools, `tool_choice`, `response_format` and the sampling options, each mapped
//! to the field OpenAI defines for it, so the request reaches the upstream unchanged in
//! meaning. The job's types were checked by the gateway; nothing here refuses a request.

use async_openai::types::chat::{
    ChatCompletionMessageToolCall, ChatCompletionMessageToolCalls, ChatCompletionNamedToolChoice,
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestAssistantMessageContent,
    ChatCompletionRequestAssistantMessageContentPart, ChatCompletionRequestMessage,
    ChatCompletionRequestMessageContentPartImage, ChatCompletionRequestMessageContentPartText,
    ChatCompletionRequestSystemMessage, ChatCompletionRequestSystemMessageContent,
    ChatCompletionRequestSystemMessageContentPart, ChatCompletionRequestToolMessage,
    ChatCompletionRequestToolMessageContent, ChatCompletionRequestToolMessageContentPart,
    ChatCompletionRequestUserMessage, ChatCompletionRequestUserMessageContent,
    ChatCompletionRequestUserMessageContentPart, ChatCompletionStreamOptions, ChatCompletionTool,
    ChatCompletionToolChoiceOption, ChatCompletionTools, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs, FunctionCall, FunctionName, FunctionObject, ImageDetail,
    ImageUrl, ResponseFormat, ResponseFormatJsonSchema, StopConfiguration, ToolChoiceOptions,
};
use stream_schema::message::{
    self, ContentPart, MessageContent, ResponseFormat as Format, Tool, ToolChoice, ToolChoiceMode,
};
use stream_schema::{ChatMessage, Job, Role};

use super::UpstreamError;

/// The streaming request for `job` on the upstream model `model`, with usage asked for.
pub(super) fn build(model: &str, job: &Job) -> Result<CreateChatCompletionRequest, UpstreamError> {
    let mut args = CreateChatCompletionRequestArgs::default();
    args.model(model)
        .messages(job.messages.iter().map(message).collect::<Vec<_>>())
        .stream(true)
        // Always ask for usage; when the upstream ignores it the producer counts tokens.
        .stream_options(ChatCompletionStreamOptions {
            include_usage: Some(true),
            ..Default::default()
        });
    if let Some(max_tokens) = job.max_tokens {
        // `max_tokens` (not `max_completion_tokens`): it is what most OpenAI-compatible
        // servers read.
        args.max_tokens(max_tokens);
    }
    if let Some(temperature) = job.temperature {
        args.temperature(temperature);
    }
    let options = &job.options;
    if !options.tools.is_empty() {
        args.tools(options.tools.iter().map(tool).collect::<Vec<_>>());
    }
    if let Some(choice) = &options.tool_choice {
        args.tool_choice(tool_choice(choice));
    }
    if let Some(format) = &options.response_format {
        args.response_format(response_format(format));
    }
    if let Some(top_p) = options.top_p {
        args.top_p(top_p);
    }
    if !options.stop.is_empty() {
        args.stop(StopConfiguration::StringArray(options.stop.clone()));
    }
    if let Some(seed) = options.seed {
        args.seed(seed);
    }
    args.build()
        .map_err(|e| UpstreamError::Invalid(e.to_string()))
}

fn text_part(text: &str) -> ChatCompletionRequestMessageContentPartText {
    ChatCompletionRequestMessageContentPartText {
        text: text.to_owned(),
        prompt_cache_breakpoint: None,
    }
}

/// The text parts of `parts` (the only kind system, assistant and tool messages take; the
/// gateway lets images through in user messages only).
fn text_parts(
    parts: &[ContentPart],
) -> impl Iterator<Item = ChatCompletionRequestMessageContentPartText> {
    parts.iter().filter_map(|part| match part {
        ContentPart::Text { text } => Some(text_part(text)),
        ContentPart::ImageUrl { .. } => None,
    })
}

fn detail(detail: message::ImageDetail) -> ImageDetail {
    match detail {
        message::ImageDetail::Auto => ImageDetail::Auto,
        message::ImageDetail::Low => ImageDetail::Low,
        message::ImageDetail::High => ImageDetail::High,
        message::ImageDetail::Original => ImageDetail::Original,
    }
}

fn user_content(content: Option<&MessageContent>) -> ChatCompletionRequestUserMessageContent {
    match content {
        None => ChatCompletionRequestUserMessageContent::Text(String::new()),
        Some(MessageContent::Text(text)) => {
            ChatCompletionRequestUserMessageContent::Text(text.clone())
        }
        Some(MessageContent::Parts(parts)) => ChatCompletionRequestUserMessageContent::Array(
            parts
                .iter()
                .map(|part| match part {
                    ContentPart::Text { text } => {
                        ChatCompletionRequestUserMessageContentPart::Text(text_part(text))
                    }
                    ContentPart::ImageUrl { image_url } => {
                        ChatCompletionRequestUserMessageContentPart::ImageUrl(
                            ChatCompletionRequestMessageContentPartImage {
                                image_url: ImageUrl {
                                    url: image_url.url.clone(),
                                    detail: image_url.detail.map(detail),
                                },
                                prompt_cache_breakpoint: None,
                            },
                        )
                    }
                })
                .collect(),
        ),
    }
}

fn message(message: &ChatMessage) -> ChatCompletionRequestMessage {
    let content = message.content.as_ref();
    let name = message.name.clone();
    match message.role {
        Role::System => ChatCompletionRequestSystemMessage {
            content: match content {
                Some(MessageContent::Parts(parts)) => {
                    ChatCompletionRequestSystemMessageContent::Array(
                        text_parts(parts)
                            .map(ChatCompletionRequestSystemMessageContentPart::Text)
                            .collect(),
                    )
                }
                _ => ChatCompletionRequestSystemMessageContent::Text(message.text_content()),
            },
            name,
        }
        .into(),
        Role::User => ChatCompletionRequestUserMessage {
            content: user_content(content),
            name,
        }
        .into(),
        Role::Assistant => ChatCompletionRequestAssistantMessage {
            content: content.map(|content| match content {
                MessageContent::Text(text) => {
                    ChatCompletionRequestAssistantMessageContent::Text(text.clone())
                }
                MessageContent::Parts(parts) => {
                    ChatCompletionRequestAssistantMessageContent::Array(
                        text_parts(parts)
                            .map(ChatCompletionRequestAssistantMessageContentPart::Text)
                            .collect(),
                    )
                }
            }),
            name,
            tool_calls: (!message.tool_calls.is_empty()).then(|| {
                message
                    .tool_calls
                    .iter()
                    .map(|call| {
                        ChatCompletionMessageToolCalls::Function(ChatCompletionMessageToolCall {
                            id: call.id.clone(),
                            function: FunctionCall {
                                name: call.function.name.clone(),
                                arguments: call.function.arguments.clone(),
                            },
                        })
                    })
                    .collect()
            }),
            ..Default::default()
        }
        .into(),
        Role::Tool => ChatCompletionRequestToolMessage {
            content: match content {
                Some(MessageContent::Parts(parts)) => {
                    ChatCompletionRequestToolMessageContent::Array(
                        text_parts(parts)
                            .map(ChatCompletionRequestToolMessageContentPart::Text)
                            .collect(),
                    )
                }
                _ => ChatCompletionRequestToolMessageContent::Text(message.text_content()),
            },
            tool_call_id: message.tool_call_id.clone().unwrap_or_default(),
        }
        .into(),
    }
}

fn tool(tool: &Tool) -> ChatCompletionTools {
    let function = &tool.function;
    ChatCompletionTools::Function(ChatCompletionTool {
        function: FunctionObject {
            name: function.name.clone(),
            description: function.description.clone(),
            parameters: function.parameters.clone(),
            strict: function.strict,
        },
    })
}

fn tool_choice(choice: &ToolChoice) -> ChatCompletionToolChoiceOption {
    match choice {
        ToolChoice::Mode(mode) => ChatCompletionToolChoiceOption::Mode(match mode {
            ToolChoiceMode::None => ToolChoiceOptions::None,
            ToolChoiceMode::Auto => ToolChoiceOptions::Auto,
            ToolChoiceMode::Required => ToolChoiceOptions::Required,
        }),
        ToolChoice::Function(named) => {
            ChatCompletionToolChoiceOption::Function(ChatCompletionNamedToolChoice {
                function: FunctionName {
                    name: named.function.name.clone(),
                },
            })
        }
    }
}

fn response_format(format: &Format) -> ResponseFormat {
    match format {
        Format::Text => ResponseFormat::Text,
        Format::JsonObject => ResponseFormat::JsonObject,
        Format::JsonSchema { json_schema } => ResponseFormat::JsonSchema {
            json_schema: ResponseFormatJsonSchema {
                description: json_schema.description.clone(),
                name: json_schema.name.clone(),
                schema: json_schema.schema.clone(),
                strict: json_schema.strict,
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use stream_schema::{ChatOptions, ModelId, RequestId, SessionId};

    use super::*;

    /// What a chat request in OpenAI's own JSON looks like after the round trip through a job:
    /// the request body the upstream receives.
    #[test]
    fn the_upstream_body_says_what_the_client_sent() -> anyhow::Result<()> {
        let messages = serde_json::json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO", "detail": "low"}},
            ]},
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "look", "arguments": "{\"x\":1}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
        ]);
        let tools = serde_json::json!([{"type": "function", "function": {"name": "look",
            "description": "Looks", "parameters": {"type": "object", "properties": {}}}}]);
        let format = serde_json::json!({"type": "json_schema",
            "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": true}});
        let job = Job {
            request_id: RequestId::new(),
            session_id: SessionId::parse("s")?,
            model_id: ModelId::parse("m")?,
            messages: serde_json::from_value(messages.clone())?,
            max_tokens: Some(50),
            temperature: Some(0.5),
            options: ChatOptions {
                tools: serde_json::from_value(tools.clone())?,
                tool_choice: Some(serde_json::from_value(
                    serde_json::json!({"type": "function", "function": {"name": "look"}}),
                )?),
                response_format: Some(serde_json::from_value(format.clone())?),
                top_p: Some(0.25),
                stop: vec!["END".to_owned()],
                seed: Some(42),
            },
            enqueued_at: 1,
            traceparent: None,
            token_cap: None,
        };

        let body = serde_json::to_value(build("upstream-model", &job)?)?;

        assert_eq!(body["model"], "upstream-model");
        assert_eq!(body["messages"], messages);
        assert_eq!(body["tools"], tools);
        assert_eq!(
            body["tool_choice"],
            serde_json::json!({"type": "function", "function": {"name": "look"}})
        );
        assert_eq!(body["response_format"], format);
        assert_eq!(body["top_p"], 0.25);
        assert_eq!(body["stop"], serde_json::json!(["END"]));
        assert_eq!(body["seed"], 42);
        assert_eq!(body["max_tokens"], 50);
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        Ok(())
    }

    #[test]
    fn a_plain_job_sends_what_it_always_did() -> anyhow::Result<()> {
        let job = Job {
            request_id: RequestId::new(),
            session_id: SessionId::parse("s")?,
            model_id: ModelId::parse("m")?,
            messages: vec![ChatMessage::text(Role::User, "hi")],
            max_tokens: None,
            temperature: None,
            options: ChatOptions::default(),
            enqueued_at: 1,
            traceparent: None,
            token_cap: None,
        };
        let body = serde_json::to_value(build("m", &job)?)?;
        assert_eq!(
            body["messages"],
            serde_json::json!([{"role": "user", "content": "hi"}])
        );
        for absent in [
            "tools",
            "tool_choice",
            "response_format",
            "top_p",
            "stop",
            "seed",
        ] {
            assert!(body.get(absent).is_none(), "{absent} in {body}");
        }
        Ok(())
    }
}
