"""Drives the gateway with the official `openai` Python package (e2e test `openai_sdk::`).

Reads BASE_URL, API_KEY, LIMITED_KEY (a key allowed one request per window), MODEL,
TEXT_PROMPT and TOOLS_PROMPT from the environment and prints one JSON object: what the SDK
rebuilt from each streamed and non-streamed completion, and the exception class of each
refused request.
"""

import json
import os

import openai

base_url = os.environ["BASE_URL"]
model = os.environ["MODEL"]
client = openai.OpenAI(base_url=base_url, api_key=os.environ["API_KEY"], max_retries=0)
messages = lambda prompt: [{"role": "user", "content": prompt}]  # noqa: E731


def streamed(prompt):
    content, reasoning, calls, finish, usage, ids = "", "", {}, None, None, set()
    stream = client.chat.completions.create(
        model=model,
        messages=messages(prompt),
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        ids.add(chunk.id)
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            reasoning += getattr(delta, "reasoning_content", None) or ""
            for call in delta.tool_calls or []:
                slot = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                slot["id"] += call.id or ""
                if call.function is not None:
                    slot["name"] += call.function.name or ""
                    slot["arguments"] += call.function.arguments or ""
            if choice.finish_reason is not None:
                finish = choice.finish_reason
    return {
        "content": content,
        "reasoning": reasoning,
        "calls": [calls[i] for i in sorted(calls)],
        "finish": finish,
        "usage": usage,
        "ids": sorted(ids),
    }


def whole(prompt):
    completion = client.chat.completions.create(model=model, messages=messages(prompt))
    message = completion.choices[0].message
    return {
        "content": message.content or "",
        "reasoning": getattr(message, "reasoning_content", None) or "",
        "calls": [
            {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in message.tool_calls or []
        ],
        "finish": completion.choices[0].finish_reason,
        "usage": completion.usage.completion_tokens,
    }


def refusal(make):
    try:
        make()
    except openai.APIStatusError as error:
        return type(error).__name__
    return "no error"


def create(api_key, model_id):
    return lambda: openai.OpenAI(
        base_url=base_url, api_key=api_key, max_retries=0
    ).chat.completions.create(model=model_id, messages=messages("hi"))


def rate_limited():
    # The limited key admits one request per window: the second is refused.
    first = refusal(create(os.environ["LIMITED_KEY"], model))
    return refusal(create(os.environ["LIMITED_KEY"], model)) if first == "no error" else first


print(
    json.dumps(
        {
            "text": streamed(os.environ["TEXT_PROMPT"]),
            "tools": streamed(os.environ["TOOLS_PROMPT"]),
            "whole_text": whole(os.environ["TEXT_PROMPT"]),
            "whole_tools": whole(os.environ["TOOLS_PROMPT"]),
            "models": [m.id for m in client.models.list()],
            "unauthorized": refusal(create("sk-wrong", model)),
            "unknown_model": refusal(create(os.environ["API_KEY"], "no-such-model")),
            "rate_limited": rate_limited(),
        }
    )
)
