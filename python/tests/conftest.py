"""Fixtures of the Python package's tests: generated checkpoints (shared with the Rust tests' cache),
converted once per session, and the CLI binary the results are compared with."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ["phi2", "stablelm", "qwen"]


def cli() -> Path:
    """The `moellava` binary built from this tree (MOELLAVA_BIN, else target/debug or target/release)."""
    env = os.environ.get("MOELLAVA_BIN")
    candidates = [Path(env)] if env else [ROOT / "target/debug/moellava", ROOT / "target/release/moellava"]
    for c in candidates:
        if c.exists():
            return c
    pytest.fail(f"no moellava binary at {', '.join(map(str, candidates))}: run `cargo build` first")


def checkpoint(backbone: str, tower: str = "clip") -> Path:
    """tools/gen_checkpoint.py's tiny random checkpoint, cached where the Rust tests cache it."""
    gen = ROOT / "tools/gen_checkpoint.py"
    digest = hashlib.sha256(gen.read_bytes()).hexdigest()[:12]
    key = f"backbone_{backbone}_tower_{tower}"
    out = ROOT / "target/test-checkpoints" / digest / key
    if not (out / "model/config.json").exists():
        tmp = out.with_name(f"{key}.tmp-py-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(
            [sys.executable, str(gen), "--backbone", backbone, "--tower", tower, "--out", str(tmp)], check=True, cwd=ROOT
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(out)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # a concurrent run won the race
    return out


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """family → a GGUF converted from its checkpoint by moellava.convert (f32, reference precision)."""
    import moellava

    d = tmp_path_factory.mktemp("models")
    out = {}
    for f in FAMILIES:
        path = d / f"{f}.gguf"
        written = moellava.convert(checkpoint(f) / "model", path, type="f32")
        assert written == [str(path)]
        out[f] = path
    return out


@pytest.fixture(scope="session")
def image() -> Path:
    return ROOT / "tests/fixtures/images/wide.png"
