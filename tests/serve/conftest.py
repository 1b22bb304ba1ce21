"""Fixtures of the `moellava serve` tests: the trained toy model converted once, and servers started
on a free port of 127.0.0.1 (the address is read from the server's first line on stderr)."""

import base64
import io
import os
import re
import subprocess
import threading
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "models/moellava-toy"
IMAGE = TOY / "example.png"
# Limits the tests probe (small, so that each is cheap to cross).
LIMITS = ["--max-body-bytes", "2000000", "--max-image-bytes", "300000", "--max-image-pixels", "1000000"]


def cli() -> Path:
    env = os.environ.get("MOELLAVA_BIN")
    candidates = [Path(env)] if env else [ROOT / "target/debug/moellava", ROOT / "target/release/moellava"]
    for c in candidates:
        if c.exists():
            return c
    pytest.fail(f"no moellava binary at {', '.join(map(str, candidates))}: run `cargo build` first")


def data_url(path: Path = IMAGE) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def png_bytes(width: int, height: int, color=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


class Server:
    """A `moellava serve` process; `url` is its base address, `pid` its process id."""

    def __init__(self, model: Path, *extra: str):
        args = [str(cli()), "serve", "-m", str(model), "--port", "0", "--threads", "2", *LIMITS, *extra]
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        first = self.proc.stderr.readline()
        self.log.append(first)
        m = re.search(r"on (http://[0-9.:]+)/", first)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {first}{self.proc.stderr.read()}")
        self.url = m.group(1)
        self.pid = self.proc.pid
        # Keep draining stderr so the server never blocks on a full pipe.
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()

    def chat(self, body: dict, timeout: float = 120, **kw) -> httpx.Response:
        return httpx.post(self.url + "/v1/chat/completions", json=body, timeout=timeout, **kw)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "toy-q4.gguf"
    subprocess.run([str(cli()), "convert", str(TOY / "model"), "-o", str(out), "--preset", "q4", "--quiet"], check=True)
    return out


@pytest.fixture(scope="session")
def server(toy_model):
    s = Server(toy_model, "--max-batch", "8", "--max-queue", "32")
    yield s
    s.stop()
