#!/usr/bin/env python3
"""Throughput of `moellava serve` under concurrent clients (BENCHMARKS.md, "Serving").

Starts the server on a free port, then for each client count C runs C clients that each send R
streaming requests back to back (temperature 0, `ignore_eos` so every answer is `--max-tokens` long)
and reports the aggregate generated tokens/s (all tokens ÷ wall time of the round), its ratio to one
client, and the time to first token (p50, p95) under that load. Rounds run in the given order in one
server process, after one warm-up request.

  .venv/bin/python tools/serve_bench.py -m build/demo/toy-q4.gguf --clients 1,4,8 --requests 4 \\
      --max-tokens 32 --image models/moellava-toy/example.png --json build/serve-bench.json
"""

import argparse
import base64
import concurrent.futures as cf
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def start(bin_: Path, model: Path, threads: int, max_batch: int) -> tuple[subprocess.Popen, str]:
    args = [str(bin_), "serve", "-m", str(model), "--port", "0", "--threads", str(threads), "--max-batch", str(max_batch)]
    p = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    first = p.stderr.readline()
    m = re.search(r"on (http://[0-9.:]+)/", first)
    if not m:
        p.kill()
        sys.exit(f"serve_bench: the server did not start: {first}{p.stderr.read()}")
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
    return p, m.group(1)


def one(url: str, body: dict) -> tuple[float, int, float]:
    """(ttft s, completion tokens, total s) of one streaming request."""
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=3600) as r:
        if r.status_code != 200:
            sys.exit(f"serve_bench: HTTP {r.status_code}: {r.read().decode()}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            c = json.loads(line[6:])
            if "error" in c:
                sys.exit(f"serve_bench: {c['error']['message']}")
            if c.get("usage"):
                tokens = c["usage"]["completion_tokens"]
            if ttft is None and c["choices"] and c["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
    return ttft if ttft is not None else time.perf_counter() - t0, tokens, time.perf_counter() - t0


def pct(v: list[float], q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True, type=Path)
    ap.add_argument("--bin", type=Path, default=ROOT / "target/release/moellava")
    ap.add_argument("--clients", default="1,4,8", help="client counts, one round each (default 1,4,8)")
    ap.add_argument("--requests", type=int, default=4, help="requests per client per round")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--image", type=Path, help="ask about this picture (default: a text-only question)")
    ap.add_argument("--question", default="Describe the image in detail.")
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args()
    for p, what in [(a.model, "--model"), (a.bin, "--bin")] + ([(a.image, "--image")] if a.image else []):
        if not p.exists():
            sys.exit(f"serve_bench: {what} {p} does not exist")
    content = a.question
    if a.image:
        url = "data:image/png;base64," + base64.b64encode(a.image.read_bytes()).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": a.question}]
    body = {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": a.max_tokens,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    proc, url = start(a.bin, a.model, a.threads, a.max_batch)
    rounds = []
    try:
        one(url, body)  # warm-up: page the weights in
        for c in [int(x) for x in a.clients.split(",")]:
            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(c) as pool:
                res = [r for rs in pool.map(lambda _: [one(url, body) for _ in range(a.requests)], range(c)) for r in rs]
            wall = time.perf_counter() - t0
            ttfts = [r[0] for r in res]
            tokens = sum(r[1] for r in res)
            rounds.append({"clients": c, "requests": len(res), "tokens": tokens, "wall_s": wall,
                           "tokens_per_s": tokens / wall, "ttft_p50_s": statistics.median(ttfts),
                           "ttft_p95_s": pct(ttfts, 0.95)})
            r = rounds[-1]
            print(f"{c:>3} clients: {r['tokens']:>5} tokens in {wall:7.1f} s = {r['tokens_per_s']:7.2f} tok/s "
                  f"(×{r['tokens_per_s'] / rounds[0]['tokens_per_s']:.2f} of {rounds[0]['clients']} client(s)); "
                  f"TTFT p50 {r['ttft_p50_s']:.2f} s, p95 {r['ttft_p95_s']:.2f} s", flush=True)
    finally:
        proc.terminate()
        proc.wait()
    out = {"model": a.model.name, "threads": a.threads, "max_batch": a.max_batch, "max_tokens": a.max_tokens,
           "image": bool(a.image), "rounds": rounds}
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
