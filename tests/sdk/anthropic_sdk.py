"""Drives the chat_gateway with the official `anthropic` Python SDK, unchanged but for its
base URL. Run by tests/chat_gateway_sdk.rs:

    python tests/sdk/anthropic_sdk.py create|stream|errors

with GATEWAY_URL, GATEWAY_KEY (a user key) and GATEWAY_OTHER_KEY in the environment. Prints
one JSON object for the Rust test to check; any unexpected exception fails the run.
"""

import json
import os
import sys

import anthropic

URL = os.environ["GATEWAY_URL"]
KEY = os.environ["GATEWAY_KEY"]
MESSAGES = [{"role": "user", "content": "Hello from the official SDK"}]


def client(key=KEY):
    # No retries: the test checks what the gateway answers, not the SDK's backoff.
    return anthropic.Anthropic(base_url=URL, api_key=key, max_retries=0, timeout=30.0)


def usage(u):
    return {
        "input_tokens": u.input_tokens,
        "output_tokens": u.output_tokens,
        "cache_creation_input_tokens": u.cache_creation_input_tokens,
        "cache_read_input_tokens": u.cache_read_input_tokens,
    }


def create():
    msg = client().messages.create(
        model="claude-sonnet-4-5", max_tokens=256, messages=MESSAGES
    )
    return {
        "type": msg.type,
        "id": msg.id,
        "model": msg.model,
        "role": msg.role,
        "stop_reason": msg.stop_reason,
        "text": "".join(b.text for b in msg.content if b.type == "text"),
        "usage": usage(msg.usage),
        "request_id": msg._request_id,
    }


def stream():
    events = []
    text = []
    with client().messages.stream(
        model="claude-haiku-4-5", max_tokens=256, messages=MESSAGES
    ) as s:
        for event in s:
            events.append(event.type)
            if event.type == "text":
                text.append(event.text)
        final = s.get_final_message()
    return {
        "events": events,
        "text": "".join(text),
        "final_text": "".join(b.text for b in final.content if b.type == "text"),
        "stop_reason": final.stop_reason,
        "model": final.model,
        "usage": usage(final.usage),
    }


def caught(call):
    """Runs `call`, which must raise an APIStatusError; describes it."""
    try:
        call()
    except anthropic.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        err = body.get("error", {}) if isinstance(body, dict) else {}
        return {
            "class": type(e).__name__,
            "classes": [c.__name__ for c in type(e).__mro__],
            "status": e.status_code,
            "type": err.get("type"),
            "message": err.get("message"),
            "retry_after": e.response.headers.get("retry-after"),
            "should_retry": e.response.headers.get("x-should-retry"),
            "request_id": e.request_id,
        }
    raise AssertionError("the call did not fail")


def errors():
    out = {}
    out["401"] = caught(
        lambda: client("sk-not-a-key-000000000000").messages.create(
            model="claude-sonnet-4-5", max_tokens=256, messages=MESSAGES
        )
    )
    out["400"] = caught(
        lambda: client().messages.create(
            model="claude-sonnet-4-5", max_tokens=0, messages=[]
        )
    )
    out["529"] = caught(
        lambda: client().messages.create(
            model="mock-overloaded", max_tokens=256, messages=MESSAGES
        )
    )
    # The rate limit: the other user calls until refused.
    other = client(os.environ["GATEWAY_OTHER_KEY"])
    for _ in range(10):
        try:
            other.messages.create(model="claude-haiku-4-5", max_tokens=64, messages=MESSAGES)
        except anthropic.RateLimitError:
            break
    out["429"] = caught(
        lambda: other.messages.create(
            model="claude-haiku-4-5", max_tokens=64, messages=MESSAGES
        )
    )
    return out


if __name__ == "__main__":
    scenario = {"create": create, "stream": stream, "errors": errors}[sys.argv[1]]
    print(json.dumps({"sdk_version": anthropic.__version__, "result": scenario()}))
