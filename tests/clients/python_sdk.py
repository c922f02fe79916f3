#!/usr/bin/env python3
"""The official `openai` Python SDK against openai-proxy, as a user would point it there.

    python3 python_sdk.py BASE_URL [UPLOAD_FILE]
        A chat completion, a streamed chat completion, an embeddings call and a file upload.
    python3 python_sdk.py BASE_URL --expect-error STATUS ERROR_JSON
        Every call must fail with the SDK's status error carrying the proxy's own error object.
    python3 python_sdk.py BASE_URL --rate-limited
        A chat completion without retries must fail with RateLimitError and Retry-After; then
        one with the SDK's retries must succeed once the proxy lets it in.

Exits 0 and prints a short summary, or exits 1 with the reason. tests/sdk.rs runs it against the
fake upstream and then checks what that upstream received.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

try:
    import openai
except ImportError:
    sys.exit(
        "python_sdk.py: the `openai` package is missing; "
        "install it with: pip install -r tests/clients/requirements.txt"
    )

# The key the SDK is given: a client's own OpenAI key, or a token of the proxy's (tokens mode).
API_KEY = os.environ.get("OPENAI_PROXY_TEST_API_KEY", "sk-test-SECRET-KEY-123")
MODEL = "gpt-4o-mini"
# The fake upstream reads these headers: this many content events, this far apart. The gap is
# wide enough that a stream buffered anywhere on the way shows up as chunks arriving together.
STREAM_EVENTS = 6
STREAM_GAP_MS = 100
# A proxy that answers before reading the request body and then closes at once races the client
# still sending it: the client's write fails and it never reads the answer. Whether one upload
# loses that race is chance, so the error check makes several.
ERROR_UPLOADS = 8


class Failure(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Failure(message)


def client(base_url: str) -> openai.OpenAI:
    # No retries: a retry would hide a flaky proxy and turn a 502 check into three requests.
    return openai.OpenAI(api_key=API_KEY, base_url=base_url, max_retries=0, timeout=30.0)


def chat(c: openai.OpenAI) -> str:
    completion = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello"}]
    )
    check(completion.object == "chat.completion", f"chat: object is {completion.object!r}")
    text = completion.choices[0].message.content
    check(text == "Hello from the fake upstream.", f"chat: content is {text!r}")
    check(completion.usage is not None and completion.usage.total_tokens == 11, "chat: usage lost")
    check(
        completion._request_id == "req_upstream_123",
        f"chat: OpenAI's x-request-id did not reach the SDK: {completion._request_id!r}",
    )
    return f"chat: {text!r}"


def stream(c: openai.OpenAI) -> str:
    chunks = []
    arrivals = []
    with c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count"}],
        stream=True,
        extra_headers={
            "x-test-stream": "python-sdk",
            "x-test-events": str(STREAM_EVENTS),
            "x-test-gap-ms": str(STREAM_GAP_MS),
        },
    ) as response:
        for chunk in response:
            chunks.append(chunk)
            arrivals.append(time.monotonic())
    # One chunk per content event, then the one that carries finish_reason.
    check(
        len(chunks) == STREAM_EVENTS + 1,
        f"stream: {len(chunks)} chunks arrived, expected {STREAM_EVENTS + 1}",
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    expected = "".join(f"tok{i} " for i in range(STREAM_EVENTS))
    check(text == expected, f"stream: text joined to {text!r}, expected {expected!r}")
    check(
        chunks[-1].choices[0].finish_reason == "stop",
        f"stream: last chunk's finish_reason is {chunks[-1].choices[0].finish_reason!r}",
    )
    check(all(ch.object == "chat.completion.chunk" for ch in chunks), "stream: not all chunks")
    span = arrivals[STREAM_EVENTS - 1] - arrivals[0]
    sent_span = (STREAM_EVENTS - 1) * STREAM_GAP_MS / 1000
    # Half the upstream's spread is far from both a buffered stream (~0) and scheduler noise.
    check(
        span >= sent_span / 2,
        f"stream: content chunks arrived within {span * 1000:.0f} ms although the upstream "
        f"spread them over {sent_span * 1000:.0f} ms: something buffered the stream",
    )
    return f"stream: {len(chunks)} chunks over {span * 1000:.0f} ms, {text.strip()!r}"


def embeddings(c: openai.OpenAI) -> str:
    # The fake upstream always answers with floats, so ask for them rather than the SDK's base64.
    result = c.embeddings.create(
        model="text-embedding-3-small", input="The quick brown fox", encoding_format="float"
    )
    check(len(result.data) == 1, f"embeddings: {len(result.data)} vectors")
    vector = result.data[0].embedding
    check(vector == [0.25, -0.5, 0.125], f"embeddings: vector is {vector!r}")
    return f"embeddings: {vector}"


def upload(c: openai.OpenAI, path: str) -> str:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        created = c.files.create(file=f, purpose="fine-tune")
    name = os.path.basename(path)
    check(created.id == "file-test123", f"upload: id is {created.id!r}")
    check(created.filename == name, f"upload: upstream saw filename {created.filename!r}")
    check(created.purpose == "fine-tune", f"upload: purpose is {created.purpose!r}")
    # The fake upstream counts the multipart body it received: the file plus the part headers.
    check(
        size < created.bytes < size + 4096,
        f"upload: upstream received a {created.bytes}-byte body for a {size}-byte file",
    )
    return f"upload: {name} ({size} bytes) arrived in a {created.bytes}-byte multipart body"


def sample_file(directory: str, lines: int = 2000) -> str:
    path = os.path.join(directory, "train.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(lines):
            line = {
                "messages": [
                    {"role": "user", "content": f"question {i} ünïcødé"},
                    {"role": "assistant", "content": f"answer {i}"},
                ]
            }
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return path


def happy(base_url: str, upload_path: str | None) -> list[str]:
    c = client(base_url)
    lines = [chat(c), stream(c), embeddings(c)]
    if upload_path is None:
        with tempfile.TemporaryDirectory() as directory:
            lines.append(upload(c, sample_file(directory)))
    else:
        lines.append(upload(c, upload_path))
    return lines


def expect_error(base_url: str, status: int, expected: dict) -> list[str]:
    c = client(base_url)
    with tempfile.TemporaryDirectory() as directory:
        # About 1 MB: more than the socket buffers hold, so the body is still being sent.
        path = sample_file(directory, lines=9000)

        def upload() -> object:
            with open(path, "rb") as f:
                return c.files.create(file=f, purpose="fine-tune")

        calls = {
            "chat": lambda: c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}]
            ),
            "stream": lambda: c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
            ),
            "embeddings": lambda: c.embeddings.create(
                model="text-embedding-3-small", input="x", encoding_format="float"
            ),
        }
        calls.update({f"upload {i + 1}/{ERROR_UPLOADS}": upload for i in range(ERROR_UPLOADS)})
        lines, failures = [], []
        for name, call in calls.items():
            try:
                lines.append(error_call(name, call, status, expected))
            except Failure as failure:
                failures.append(str(failure))
        # Every failing call, not just the first: how many uploads lost the race is the evidence.
        check(not failures, f"{len(failures)} of {len(calls)} calls failed:\n  " + "\n  ".join(failures))
        return lines


def error_call(name: str, call, status: int, expected: dict) -> str:
    try:
        result = call()
    except openai.APIStatusError as e:
        error = e
    except openai.APIError as e:
        raise Failure(
            f"{name}: expected the SDK's status error {status}, got {type(e).__name__}: {e} "
            f"(cause: {e.__cause__!r})"
        ) from e
    else:
        raise Failure(f"{name}: expected an error {status}, the call returned {result!r}")
    check(error.status_code == status, f"{name}: status {error.status_code}, expected {status}")
    if status >= 500:
        check(
            isinstance(error, openai.InternalServerError),
            f"{name}: {type(error).__name__} is not InternalServerError",
        )
    check(error.body == expected, f"{name}: SDK's error body is {error.body!r}, expected {expected!r}")
    check(error.code == expected.get("code"), f"{name}: error.code is {error.code!r}")
    check(error.type == expected.get("type"), f"{name}: error.type is {error.type!r}")
    check(error.param is None, f"{name}: error.param is {error.param!r}")
    check(expected["message"] in str(error), f"{name}: message missing from {str(error)!r}")
    ours = error.response.headers.get("x-proxy-request-id")
    check(bool(ours), f"{name}: no x-proxy-request-id on the proxy's error")
    return f"{name}: {type(error).__name__} {error.status_code} {error.code}: {expected['message']!r} (id {ours})"


def rate_limited(base_url: str) -> list[str]:
    try:
        result = chat(client(base_url))
    except openai.RateLimitError as e:
        error = e
    else:
        raise Failure(f"chat: expected RateLimitError, the call returned {result!r}")
    check(error.code == "rate_limit_exceeded", f"429: error.code is {error.code!r}")
    retry_after = error.response.headers.get("retry-after")
    check(retry_after == "1", f"429: Retry-After is {retry_after!r}")
    # The SDK's own retries, honouring Retry-After, until the proxy lets the call in.
    patient = openai.OpenAI(api_key=API_KEY, base_url=base_url, max_retries=8, timeout=30.0)
    started = time.monotonic()
    line = chat(patient)
    return [
        f"RateLimitError 429 {error.code}, Retry-After {retry_after}",
        f"retried: {line} after {time.monotonic() - started:.1f}s",
    ]


def main(argv: list[str]) -> int:
    usage = (
        "usage: python_sdk.py BASE_URL [UPLOAD_FILE]\n"
        "       python_sdk.py BASE_URL --expect-error STATUS ERROR_JSON\n"
        "       python_sdk.py BASE_URL --rate-limited"
    )
    if len(argv) == 2 and argv[1] == "--rate-limited":
        lines = rate_limited(argv[0])
    elif len(argv) == 4 and argv[1] == "--expect-error":
        expected = json.loads(argv[3])
        lines = expect_error(argv[0], int(argv[2]), expected)
    elif len(argv) in (1, 2) and not argv[0].startswith("-"):
        lines = happy(argv[0], argv[1] if len(argv) == 2 else None)
    else:
        print(usage, file=sys.stderr)
        return 2
    print(f"python openai {openai.__version__} via {argv[0]}")
    for line in lines:
        print(f"  ok {line}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except Failure as failure:
        print(f"python_sdk.py FAILED: {failure}", file=sys.stderr)
        sys.exit(1)
