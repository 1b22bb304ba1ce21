"""The API through the official `openai` client: plain and streaming answers with an image equal the
CLI's answer to the same question; multi-turn, stop strings, usage, /v1/models, /health, /metrics,
and bearer auth."""

import json
import subprocess

import httpx
import pytest
from openai import AuthenticationError, OpenAI

from conftest import IMAGE, Server, cli, data_url

QUESTION = "What is in the picture?"


def client(server, key="none") -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def image_message(question=QUESTION):
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": data_url()}}, {"type": "text", "text": question}],
    }


def cli_answer(model, question, image=True, max_new=24):
    args = [str(cli()), "run", "-m", str(model), "-p", question, "--max-new-tokens", str(max_new), "--json", "--threads", "2"]
    if image:
        args += ["--image", str(IMAGE)]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def test_plain_answer_with_image_equals_the_cli(server, toy_model):
    r = client(server).chat.completions.create(
        model="toy-q4", messages=[image_message()], temperature=0, max_tokens=24
    )
    want = cli_answer(toy_model, QUESTION)
    assert r.choices[0].message.content == want["text"]
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == len(want["tokens"])
    assert r.usage.prompt_tokens == want["prompt_tokens"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.model == "toy-q4"


def test_streaming_answer_equals_the_plain_one(server):
    c = client(server)
    plain = c.chat.completions.create(model="m", messages=[image_message()], temperature=0, max_tokens=24)
    chunks = list(
        c.chat.completions.create(
            model="m",
            messages=[image_message()],
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text.strip() == plain.choices[0].message.content
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 1, "the answer came in pieces"
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_text_only_and_max_tokens(server, toy_model):
    r = client(server).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hello"}], temperature=0, max_tokens=3
    )
    want = cli_answer(toy_model, "Hello", image=False, max_new=3)
    assert r.choices[0].message.content == want["text"]
    assert r.usage.completion_tokens <= 3


def test_multi_turn_uses_the_template(server, toy_model):
    first = client(server).chat.completions.create(model="m", messages=[image_message()], temperature=0, max_tokens=12)
    answer = first.choices[0].message.content
    messages = [image_message(), {"role": "assistant", "content": answer}, {"role": "user", "content": "And what colour?"}]
    r = client(server).chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=12)
    # The same conversation as a raw prompt through the CLI, built from the file's template.
    t = template(toy_model)
    raw = (f"{t['system']}{t['sep']}USER: <image>\n{QUESTION}{t['sep']}ASSISTANT: {answer}{t['sep2']}"
           f"USER: And what colour?{t['sep']}ASSISTANT:")
    out = subprocess.run(
        [str(cli()), "run", "-m", str(toy_model), "--raw-prompt", "-p", raw, "--image", str(IMAGE),
         "--max-new-tokens", "12", "--json", "--threads", "2"],
        check=True, capture_output=True, text=True,
    ).stdout
    assert r.choices[0].message.content == json.loads(out)["text"]


def template(model):
    """The chat template's strings, read from the GGUF with gguf-py."""
    from gguf import GGUFReader

    fields = GGUFReader(str(model)).fields
    return {k: fields[f"moellava.chat.{k}"].contents() for k in ["system", "sep", "sep2"]}


def test_stop_string_cuts_the_answer(server):
    c = client(server)
    full = c.chat.completions.create(model="m", messages=[image_message()], temperature=0, max_tokens=24)
    text = full.choices[0].message.content
    words = text.split()
    assert len(words) >= 3, text
    stop = " " + words[2]
    r = c.chat.completions.create(model="m", messages=[image_message()], temperature=0, max_tokens=24, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[: text.index(stop)].strip()
    chunks = c.chat.completions.create(
        model="m", messages=[image_message()], temperature=0, max_tokens=24, stop=stop, stream=True
    )
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert stop not in streamed and streamed.strip() == r.choices[0].message.content


def test_seeded_sampling_repeats(server):
    c = client(server)
    a = c.chat.completions.create(model="m", messages=[image_message()], temperature=0.9, seed=7, max_tokens=12)
    b = c.chat.completions.create(model="m", messages=[image_message()], temperature=0.9, seed=7, max_tokens=12)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_models_health_metrics_and_page(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["toy-q4"]
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["model"] == "toy-q4"
    m = httpx.get(server.url + "/metrics").text
    for name in ["moellava_requests_total", "moellava_queue_depth", "moellava_decode_tokens_per_second",
                 "moellava_ttft_seconds_bucket", "moellava_generated_tokens_total"]:
        assert name in m
    assert 'outcome="completed"' in m
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "<script>" in page.text
    assert "http://" not in page.text and "https://" not in page.text, "the page must load nothing from outside"


def test_api_key(toy_model):
    s = Server(toy_model, "--api-key", "sesame")
    try:
        with pytest.raises(AuthenticationError):
            client(s, "wrong").chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
        r = client(s, "sesame").chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
        assert r.usage.completion_tokens <= 2
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.stop()
