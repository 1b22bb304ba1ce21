"""A bounded load test on 127.0.0.1: 16 concurrent clients × 20 requests, plain and streaming, some
disconnecting early. No crash, no error but the intended 503s (retried), every completed answer equal
to the same request run alone at temperature 0, the server's RSS flat after warm-up, and every slot
freed at the end."""

import concurrent.futures as cf
import json
import time

import httpx

from conftest import Server, data_url

CLIENTS = 16
REQUESTS_PER_CLIENT = 20
# RSS may grow by this much after warm-up (allocator noise; a leaked KV cache per request would be
# far more over 320 requests).
RSS_GROWTH_LIMIT = 48 << 20


def requests_():
    img = data_url()
    image = lambda q: [{"type": "image_url", "image_url": {"url": img}}, {"type": "text", "text": q}]
    return [
        {"messages": [{"role": "user", "content": image("What is in the picture?")}], "max_tokens": 20},
        {"messages": [{"role": "user", "content": image("Is there a red circle in the image?")}], "max_tokens": 8},
        {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16},
        {"messages": [{"role": "user", "content": "Describe a blue square."}], "max_tokens": 24},
    ]


def post(s: Server, body: dict, stream: bool, disconnect: bool):
    """(status, text) of one request; 503s are retried after a short wait; (None, None) when the client
    hung up on purpose."""
    body = dict(body, temperature=0, stream=stream)
    while True:
        if not stream:
            r = s.chat(body)
            if r.status_code == 503:
                time.sleep(0.1)
                continue
            return r.status_code, r.json()
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=120) as r:
            if r.status_code == 503:
                r.read()
                time.sleep(0.1)
                continue
            if r.status_code != 200:
                return r.status_code, json.loads(r.read())
            text = ""
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                piece = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
                if piece and disconnect:
                    return None, None  # leaves the `with`: the connection closes mid-answer
                text += piece or ""
            return 200, {"choices": [{"message": {"content": text.strip()}}]}


def test_load(toy_model):
    s = Server(toy_model, "--max-batch", "8", "--max-queue", "8")
    try:
        reqs = requests_()
        alone = [post(s, r, False, False)[1]["choices"][0]["message"]["content"] for r in reqs]
        # Warm-up: one concurrent round.
        with cf.ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(lambda i: post(s, reqs[i % 4], i % 2 == 1, False), range(CLIENTS)))
        warm_rss = s.rss_bytes()

        def client(c: int):
            results = []
            for i in range(REQUESTS_PER_CLIENT):
                k = (c + i) % len(reqs)
                stream = (c + i) % 2 == 1
                disconnect = stream and (c * 7 + i) % 5 == 0
                results.append((k, disconnect, *post(s, reqs[k], stream, disconnect)))
            return results

        t0 = time.time()
        with cf.ThreadPoolExecutor(CLIENTS) as pool:
            everything = [r for rs in pool.map(client, range(CLIENTS)) for r in rs]
        elapsed = time.time() - t0
        assert s.proc.poll() is None, "the server died"
        hung_up = sum(1 for _, d, _, _ in everything if d)
        done = [(k, status, body) for k, d, status, body in everything if not d]
        assert len(everything) == CLIENTS * REQUESTS_PER_CLIENT and hung_up > 0
        for k, status, body in done:
            assert status == 200, body
            assert body["choices"][0]["message"]["content"] == alone[k], f"request {k} answered differently under load"
        # Slots of the clients that hung up are freed: nothing stays active or queued.
        for _ in range(100):
            h = httpx.get(s.url + "/health").json()
            if h["active"] == 0 and h["queued"] == 0:
                break
            time.sleep(0.1)
        assert h["active"] == 0 and h["queued"] == 0, h
        metrics = httpx.get(s.url + "/metrics").text
        assert 'outcome="failed"} 0' in metrics and 'outcome="invalid"} 0' in metrics
        growth = s.rss_bytes() - warm_rss
        assert growth < RSS_GROWTH_LIMIT, f"RSS grew by {growth / 2**20:.1f} MiB after warm-up"
        print(f"load: {len(everything)} requests ({hung_up} hung up early) in {elapsed:.1f} s; RSS after warm-up "
              f"{warm_rss / 2**20:.1f} MiB, growth {growth / 2**20:+.1f} MiB")
    finally:
        s.stop()
