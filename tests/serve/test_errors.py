"""Malformed and oversized requests: each gets a clear error in OpenAI's shape with the right status,
naming the field at fault; unknown fields are ignored; a full queue answers 503 with Retry-After."""

import base64
import concurrent.futures as cf

import httpx
import pytest

from conftest import Server, data_url, png_bytes


def error_of(r: httpx.Response, status: int, *needles: str, param=None, code=None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"}
    for n in needles:
        assert n in e["message"], (n, e["message"])
    if param is not None:
        assert e["param"] == param
    if code is not None:
        assert e["code"] == code
    return e


def with_image(url: str, text="What is it?") -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}],
            "max_tokens": 2}


def test_broken_json_and_wrong_types(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"messages": [', headers={"Content-Type": "application/json"})
    error_of(r, 400, "not valid JSON")
    error_of(server.chat({"messages": "hello"}), 400, "chat schema")
    error_of(server.chat({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}), 400, "chat schema")
    error_of(server.chat({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}), 400, "chat schema")
    error_of(server.chat({}), 400, "messages")


def test_bad_values(server):
    hi = [{"role": "user", "content": "hi"}]
    error_of(server.chat({"messages": []}), 400, "must not be empty", param="messages")
    error_of(server.chat({"messages": hi, "temperature": 3}), 400, "between 0 and 2", param="temperature")
    error_of(server.chat({"messages": hi, "top_p": 0}), 400, "top_p", param="temperature")
    error_of(server.chat({"messages": hi, "max_tokens": 0}), 400, "at least 1", param="max_tokens")
    error_of(server.chat({"messages": hi, "n": 2}), 400, "n = 1", param="n")
    error_of(server.chat({"messages": hi, "stop": ["a", "b", "c", "d", "e"]}), 400, "at most 4", param="stop")
    error_of(server.chat({"messages": [{"role": "tool", "content": "x"}]}), 400, "unsupported role", param="messages[0].role")
    error_of(server.chat({"messages": hi + [{"role": "assistant", "content": "x"}]}), 400, "last message must be a user")
    error_of(server.chat({"messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]}), 400,
             "unsupported content part", param="messages[0].content[0].type")


def test_unknown_fields_are_ignored(server):
    r = server.chat({"messages": [{"role": "user", "content": "hi", "name": "bob"}], "max_tokens": 2, "temperature": 0,
                     "logit_bias": {}, "user": "x", "frequency_penalty": 0, "whatever": [1, 2]})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 2


def test_image_refusals(server):
    error_of(server.chat(with_image("https://example.com/cat.png")), 400, "fetches nothing",
             param="messages[0].content[0].image_url", code="remote_image_refused")
    error_of(server.chat(with_image("data:image/png;base64,@@@notbase64@@@")), 400, "base64", code="invalid_base64")
    error_of(server.chat(with_image("data:text/plain;base64,aGk=")), 400, "data:image/")
    error_of(server.chat(with_image("data:image/png;base64," + base64.b64encode(b"not an image").decode())), 400,
             "image", code="invalid_image")
    big = "data:image/png;base64," + base64.b64encode(b"\0" * 400_000).decode()  # over --max-image-bytes 300000
    error_of(server.chat(with_image(big)), 400, "--max-image-bytes", code="image_too_large")
    wide = "data:image/png;base64," + base64.b64encode(png_bytes(1200, 1000)).decode()  # 1.2 M > 1 M pixels
    error_of(server.chat(with_image(wide)), 400, "1200×1000", "1000000-pixel limit")
    two = with_image(data_url())
    two["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": data_url()}})
    error_of(server.chat(two), 400, "at most 1 image")
    later = with_image(data_url())
    later["messages"] += [{"role": "assistant", "content": "ok"}, with_image(data_url())["messages"][0]]
    error_of(server.chat(later), 400, "at most 1 image")
    error_of(server.chat({"messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": data_url()}}]}]}),
             400, "only user messages")


def test_body_and_context_limits(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b" " * 2_100_000, headers={"Content-Type": "application/json"})
    error_of(r, 413, "--max-body-bytes", code="body_too_large")
    long = {"messages": [{"role": "user", "content": "word " * 3000}], "max_tokens": 4}
    error_of(server.chat(long), 400, "context", code="context_length_exceeded")
    fits_not = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5000}
    error_of(server.chat(fits_not), 400, "exceed the context length", code="context_length_exceeded")


def test_unknown_endpoint(server):
    error_of(httpx.get(server.url + "/v1/completions"), 404, "no such endpoint")


def test_full_queue_answers_503_with_retry_after(toy_model):
    s = Server(toy_model, "--max-batch", "1", "--max-queue", "1")
    try:
        body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 64, "temperature": 0}
        with cf.ThreadPoolExecutor(8) as pool:
            rs = list(pool.map(lambda _: s.chat(body), range(8)))
        codes = sorted(r.status_code for r in rs)
        assert codes.count(200) >= 2 and 503 in codes and set(codes) <= {200, 503}, codes
        busy = next(r for r in rs if r.status_code == 503)
        assert busy.headers["retry-after"] == "1"
        error_of(busy, 503, "--max-queue", code="queue_full")
        ok = [r.json()["choices"][0]["message"]["content"] for r in rs if r.status_code == 200]
        assert len(set(ok)) == 1, "the same request answered differently"
        assert 'outcome="rejected"' in httpx.get(s.url + "/metrics").text
    finally:
        s.stop()
