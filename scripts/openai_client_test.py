#!/usr/bin/env python3
"""Checks a running `philo serve` with the official `openai` Python package.

    python scripts/openai_client_test.py --base-url http://127.0.0.1:8000/v1 \
        --model philo-tiny --adapter tuned [--api-key KEY]

Each option also comes from the environment: OPENAI_BASE_URL, PHILO_BASE_MODEL, PHILO_ADAPTER,
OPENAI_API_KEY (a server without --api-key takes any key). The server must serve the base model
and the adapter, and its model must be able to generate at least 24 tokens after a short prompt.

Checks: the model list (base and adapter, the adapter's parent), a chat completion, the same
chat streamed (role first, the deltas add up to the whole answer's text under greedy decoding,
one finish_reason, a usage chunk), a chat naming the adapter, a text completion (whole and
streamed), log-probabilities (chat `logprobs`/`top_logprobs` and completions `logprobs`),
constrained output (`response_format` json_schema: the answer parses and fits the schema;
json_object; an unknown type is a 400), n=2 (two choices), and errors as the client raises
them: an unknown model is openai.NotFoundError, n=17
is openai.BadRequestError, a wrong API key (when one is given) is openai.AuthenticationError.

Prints one line per check and exits 1 with the failures listed if any check fails, 2 if the
`openai` package is missing.
"""

import argparse
import os
import sys
import traceback

try:
    import openai
except ImportError:
    print("error: the `openai` package is not installed (pip install openai)", file=sys.stderr)
    sys.exit(2)

MAX_TOKENS = 16
FINISH_REASONS = ("length", "stop")
MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
]


class Mismatch(Exception):
    """A check saw something other than what it expects."""


def expect(condition, message):
    if not condition:
        raise Mismatch(message)


def check_usage(usage, what, max_tokens=MAX_TOKENS):
    expect(usage is not None, f"{what}: no usage")
    expect(
        1 <= usage.completion_tokens <= max_tokens,
        f"{what}: usage.completion_tokens is {usage.completion_tokens}, expected 1..{max_tokens}",
    )
    expect(usage.prompt_tokens >= 1, f"{what}: usage.prompt_tokens is {usage.prompt_tokens}")
    expect(
        usage.total_tokens == usage.prompt_tokens + usage.completion_tokens,
        f"{what}: total_tokens {usage.total_tokens} is not prompt + completion tokens",
    )


def chat(client, model, **extra):
    params = {"max_tokens": MAX_TOKENS, "temperature": 0, **extra}
    return client.chat.completions.create(model=model, messages=MESSAGES, **params)


def check_models(client, args):
    models = {m.id: m for m in client.models.list()}
    for name in (args.model, args.adapter):
        expect(name in models, f"GET /v1/models lists {sorted(models)}, not `{name}`")
    parent = getattr(models[args.adapter], "parent", None)
    expect(
        parent == args.model,
        f"the adapter `{args.adapter}` has parent {parent!r}, expected `{args.model}`",
    )
    one = client.models.retrieve(args.adapter)
    expect(one.id == args.adapter, f"GET /v1/models/{args.adapter} answered id {one.id!r}")
    return f"{len(models)} models: {', '.join(sorted(models))}"


def check_chat(client, args):
    response = chat(client, args.model)
    expect(response.object == "chat.completion", f"object is {response.object!r}")
    expect(response.model == args.model, f"model is {response.model!r}, expected {args.model!r}")
    expect(len(response.choices) == 1, f"{len(response.choices)} choices")
    choice = response.choices[0]
    expect(choice.message.role == "assistant", f"role is {choice.message.role!r}")
    expect(isinstance(choice.message.content, str), "content is not a string")
    expect(choice.finish_reason in FINISH_REASONS, f"finish_reason is {choice.finish_reason!r}")
    check_usage(response.usage, "chat")
    return f"{response.usage.completion_tokens} tokens, finish_reason {choice.finish_reason}"


def check_chat_stream(client, args):
    whole = chat(client, args.model).choices[0].message.content
    stream = chat(client, args.model, stream=True, stream_options={"include_usage": True})
    roles, deltas, reasons, usage, chunks = [], [], [], None, 0
    for chunk in stream:
        chunks += 1
        expect(chunk.object == "chat.completion.chunk", f"chunk object is {chunk.object!r}")
        if chunk.usage is not None:
            expect(not chunk.choices, "the usage chunk has choices")
            expect(usage is None, "two usage chunks")
            usage = chunk.usage
            continue
        expect(usage is None, "a chunk after the usage chunk")
        expect(len(chunk.choices) == 1, f"a chunk with {len(chunk.choices)} choices")
        choice = chunk.choices[0]
        if choice.delta.role is not None:
            roles.append(choice.delta.role)
        if choice.delta.content:
            deltas.append(choice.delta.content)
        if choice.finish_reason is not None:
            reasons.append(choice.finish_reason)
    expect(roles == ["assistant"], f"delta roles {roles}, expected one `assistant`")
    expect(
        len(reasons) == 1 and reasons[0] in FINISH_REASONS,
        f"finish_reasons {reasons}, expected one of {FINISH_REASONS}",
    )
    check_usage(usage, "streamed chat")
    text = "".join(deltas)
    expect(
        text == whole,
        f"the streamed deltas add up to {text!r}, the whole answer was {whole!r} (both greedy)",
    )
    return f"{chunks} chunks, {len(deltas)} deltas, finish_reason {reasons[0]}"


def check_adapter_chat(client, args):
    response = chat(client, args.adapter)
    expect(
        response.model == args.adapter,
        f"model is {response.model!r}, expected the adapter {args.adapter!r}",
    )
    expect(response.choices[0].finish_reason in FINISH_REASONS, "no finish_reason")
    check_usage(response.usage, "adapter chat")
    return f"{response.usage.completion_tokens} tokens from `{args.adapter}`"


def check_completion(client, args):
    prompt = "Once upon a time"
    response = client.completions.create(
        model=args.model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
    )
    expect(response.object == "text_completion", f"object is {response.object!r}")
    expect(response.model == args.model, f"model is {response.model!r}")
    expect(len(response.choices) == 1, f"{len(response.choices)} choices")
    choice = response.choices[0]
    expect(isinstance(choice.text, str), "text is not a string")
    expect(choice.finish_reason in FINISH_REASONS, f"finish_reason is {choice.finish_reason!r}")
    check_usage(response.usage, "completion")
    pieces, reasons = [], []
    for chunk in client.completions.create(
        model=args.model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
    ):
        for c in chunk.choices:
            pieces.append(c.text)
            if c.finish_reason is not None:
                reasons.append(c.finish_reason)
    expect(len(reasons) == 1, f"the streamed completion has finish_reasons {reasons}")
    expect(
        "".join(pieces) == choice.text,
        f"the streamed completion is {''.join(pieces)!r}, the whole one {choice.text!r}",
    )
    return f"{response.usage.completion_tokens} tokens, whole and streamed agree"


def check_logprobs(client, args):
    response = chat(client, args.model, logprobs=True, top_logprobs=3)
    choice = response.choices[0]
    expect(choice.logprobs is not None, "no choices[0].logprobs with logprobs=True")
    content = choice.logprobs.content
    expect(
        len(content) == response.usage.completion_tokens,
        f"{len(content)} logprobs entries for {response.usage.completion_tokens} tokens",
    )
    for entry in content:
        expect(entry.logprob <= 0, f"logprob {entry.logprob} of {entry.token!r} is above 0")
        expect(isinstance(entry.bytes, list), f"bytes of {entry.token!r} is {entry.bytes!r}")
        top = [t.logprob for t in entry.top_logprobs]
        expect(len(top) == 3, f"{len(top)} top_logprobs, expected 3")
        expect(top == sorted(top, reverse=True), f"top_logprobs not sorted: {top}")
        # Greedy: the chosen token is the most likely one.
        expect(
            entry.top_logprobs[0].token == entry.token
            and abs(entry.top_logprobs[0].logprob - entry.logprob) < 1e-4,
            f"chosen {entry.token!r} ({entry.logprob}) is not the top one {entry.top_logprobs[0]}",
        )
    plain = chat(client, args.model)
    expect(plain.choices[0].logprobs is None, "logprobs without asking for them")
    completion = client.completions.create(
        model=args.model, prompt="Once upon a time", max_tokens=MAX_TOKENS, temperature=0, logprobs=2
    )
    legacy = completion.choices[0].logprobs
    n = completion.usage.completion_tokens
    expect(
        legacy is not None
        and len(legacy.tokens) == len(legacy.token_logprobs) == len(legacy.text_offset) == n
        and len(legacy.top_logprobs) == n,
        f"completion logprobs {legacy!r} do not cover its {n} tokens",
    )
    expect(all(len(t) <= 2 for t in legacy.top_logprobs), "more than 2 top_logprobs")
    expect_error(
        openai.BadRequestError,
        400,
        lambda: chat(client, args.model, top_logprobs=3),
        "top_logprobs without logprobs",
    )
    return f"{len(content)} chat tokens with 3 alternatives each, {n} completion tokens"


def check_choices(client, args):
    response = chat(client, args.model, n=2, temperature=0.8, seed=3)
    indices = [c.index for c in response.choices]
    expect(indices == [0, 1], f"n=2 gave choices {indices}")
    expect(
        all(c.finish_reason in FINISH_REASONS for c in response.choices),
        "a choice without a finish_reason",
    )
    check_usage(response.usage, "n=2", max_tokens=2 * MAX_TOKENS)
    return f"n=2: {response.usage.completion_tokens} completion tokens in all"


ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
    "required": ["ok", "color"],
    "additionalProperties": False,
}


def check_json(client, args):
    import json

    # A schema whose documents are short: the answer closes well within max_tokens, parses,
    # and has exactly the schema's keys and values, whatever the model.
    response = chat(
        client,
        args.model,
        max_tokens=48,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "strict": True, "schema": ANSWER_SCHEMA},
        },
    )
    choice = response.choices[0]
    expect(choice.finish_reason == "stop", f"json_schema finish_reason {choice.finish_reason}")
    value = json.loads(choice.message.content)
    expect(
        isinstance(value, dict)
        and set(value) == {"ok", "color"}
        and isinstance(value["ok"], bool)
        and value["color"] in ("red", "green", "blue"),
        f"json_schema answer {value!r} does not fit the schema",
    )
    # Any object: it parses when it closed, and starts as one when max_tokens cut it.
    response = chat(client, args.model, max_tokens=64, response_format={"type": "json_object"})
    choice = response.choices[0]
    text = choice.message.content
    if choice.finish_reason == "stop":
        expect(isinstance(json.loads(text), dict), f"json_object answer {text!r} is no object")
    else:
        expect(text.startswith("{"), f"json_object answer {text!r} does not start an object")
    expect_error(
        openai.BadRequestError,
        400,
        lambda: chat(client, args.model, response_format={"type": "xml"}),
        "response_format xml",
    )
    return f"json_schema {value}; json_object {choice.finish_reason}: {text[:40]!r}"


def expect_error(error_type, status, call, what):
    try:
        call()
    except error_type as e:
        expect(e.status_code == status, f"{what}: status {e.status_code}, expected {status}")
        body = e.body if isinstance(e.body, dict) else {}
        # The client unwraps {"error": {...}}; either way there must be a message.
        message = body.get("message") or body.get("error", {}).get("message")
        expect(bool(message), f"{what}: no error message in {e.body!r}")
        return f"{what}: {type(e).__name__} ({status}): {message}"
    except openai.APIStatusError as e:
        raise Mismatch(
            f"{what}: {type(e).__name__} ({e.status_code}), expected {error_type.__name__}: {e.body!r}"
        )
    raise Mismatch(f"{what}: no error, expected {error_type.__name__}")


def check_errors(client, args):
    lines = [
        expect_error(
            openai.NotFoundError, 404, lambda: chat(client, "no-such-model"), "unknown model"
        ),
        expect_error(openai.BadRequestError, 400, lambda: chat(client, args.model, n=17), "n=17"),
    ]
    if args.api_key and args.api_key != "none":
        wrong = openai.OpenAI(base_url=args.base_url, api_key=args.api_key + "-wrong", max_retries=0)
        lines.append(
            expect_error(
                openai.AuthenticationError, 401, lambda: wrong.models.list(), "wrong API key"
            )
        )
    return "; ".join(lines)


CHECKS = [
    ("models", check_models),
    ("chat", check_chat),
    ("streamed chat", check_chat_stream),
    ("adapter", check_adapter_chat),
    ("completion", check_completion),
    ("logprobs", check_logprobs),
    ("response_format", check_json),
    ("n", check_choices),
    ("errors", check_errors),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")
    )
    parser.add_argument("--model", default=os.environ.get("PHILO_BASE_MODEL"))
    parser.add_argument("--adapter", default=os.environ.get("PHILO_ADAPTER"))
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"))
    args = parser.parse_args()
    if not args.model or not args.adapter:
        parser.error("give the base model (--model / PHILO_BASE_MODEL) and an adapter (--adapter / PHILO_ADAPTER)")
    print(f"openai {openai.__version__} against {args.base_url}")
    # No retries: a 429 or 5xx must show, not be retried away.
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=60)
    failures = []
    for name, check in CHECKS:
        try:
            print(f"ok: {name}: {check(client, args)}")
        except Mismatch as e:
            failures.append(f"{name}: {e}")
            print(f"FAIL: {name}: {e}")
        except Exception as e:  # an unexpected exception is a failure of that check too
            failures.append(f"{name}: {type(e).__name__}: {e}")
            print(f"FAIL: {name}: unexpected {type(e).__name__}: {e}")
            traceback.print_exc()
    if failures:
        print(f"\n{len(failures)} of {len(CHECKS)} checks failed:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        sys.exit(1)
    print(f"all {len(CHECKS)} checks passed")


if __name__ == "__main__":
    main()
