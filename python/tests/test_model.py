"""The Python package against the CLI on generated checkpoints of every family."""

import json
import os
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import moellava
from conftest import FAMILIES, ROOT, cli

QUESTION = "What is in the picture?"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(cli()), *args], capture_output=True, text=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_the_cli_logits_out_bit_for_bit(models, image, tmp_path, family):
    m = moellava.Model(models[family], threads=2)
    ours = m.logits(image, QUESTION)
    npy = tmp_path / "l.npy"
    r = run_cli("run", "-m", str(models[family]), "--image", str(image), "-p", QUESTION,
                "--max-new-tokens", "1", "--logits-out", str(npy), "--threads", "2")
    assert r.returncode == 0, r.stderr
    theirs = np.load(npy)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape == (m.info["n_vocab"],)
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)), "logits differ from the CLI's"


@pytest.mark.parametrize("family", FAMILIES)
def test_ask_gives_the_cli_answer(models, image, family):
    m = moellava.Model(models[family], threads=2)
    a = m.ask(image, QUESTION, max_new_tokens=6, ignore_eos=True)
    r = run_cli("run", "-m", str(models[family]), "--image", str(image), "-p", QUESTION,
                "--max-new-tokens", "6", "--ignore-eos", "--json", "--threads", "2")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert a.tokens == j["tokens"] and a.text == j["text"]
    assert (a.prompt_tokens, a.image_tokens, a.stop_reason) == (j["prompt_tokens"], j["image_tokens"], "max_new_tokens")
    assert len(a.routing) == len(j["routing"]) == len(m.info["moe_layers"])
    for ours, theirs in zip(a.routing, j["routing"]):
        # Same float32 gate weights; the CLI prints them widened to f64, the package in shortest f32 form.
        assert ours["experts"] == theirs["experts"]
        assert np.array_equal(np.float32(ours["weights"]), np.float32(theirs["weights"]))
    assert set(a.timings) >= {"prefill_s", "decode_s", "decode_tokens_per_s", "image_encode_s"}
    assert isinstance(a.tokens[0], int) and isinstance(a.timings["prefill_s"], float)


def test_path_bytes_and_pil_images_are_the_same_picture(models, image):
    from PIL import Image

    m = moellava.Model(models["phi2"], threads=2)
    by_path = m.logits(str(image), QUESTION)
    by_bytes = m.logits(image.read_bytes(), QUESTION)
    with Image.open(image) as im:
        by_pil = m.logits(im, QUESTION)
        by_pil_rgba = m.logits(im.convert("RGBA"), QUESTION)
    for other in (by_bytes, by_pil, by_pil_rgba):
        assert np.array_equal(by_path, other)
    assert not np.array_equal(by_path, m.logits(None, QUESTION)), "a text-only prompt must differ"


def test_stream_yields_the_answer_piece_by_piece(models, image):
    m = moellava.Model(models["qwen"], threads=2)
    s = m.stream(image, QUESTION, max_new_tokens=8, ignore_eos=True)
    assert s.answer is None
    pieces = list(s)
    assert pieces and all(isinstance(p, str) for p in pieces)
    whole = m.ask(image, QUESTION, max_new_tokens=8, ignore_eos=True)
    assert "".join(pieces).strip() == whole.text
    assert s.answer == whole.__class__(**{**whole.__dict__, "timings": s.answer.timings})


def test_two_threads_sharing_a_model_answer_as_one_thread_does(models, image):
    m = moellava.Model(models["stablelm"], threads=2)
    questions = [QUESTION, "Describe the image.", "Is there a dog?", "What colour is it?"]
    alone = [m.ask(image, q, max_new_tokens=5, ignore_eos=True).tokens for q in questions]
    with ThreadPoolExecutor(max_workers=2) as pool:
        shared = list(pool.map(lambda q: m.ask(image, q, max_new_tokens=5, ignore_eos=True).tokens, questions * 2))
    assert shared == alone * 2


def test_ctrl_c_interrupts_a_long_generation(models):
    m = moellava.Model(models["phi2"], threads=1)
    # Python's own Ctrl-C handler, whatever this process inherited: a shell that starts a job in the
    # background without job control (`make test &`) makes it ignore SIGINT, and Python then installs
    # no handler, so no Ctrl-C could ever interrupt anything.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    # A real SIGINT, as Ctrl-C sends, from another process.
    killer = subprocess.Popen(["sh", "-c", f"sleep 0.1; kill -INT {os.getpid()}"])
    try:
        with pytest.raises(KeyboardInterrupt):
            m.ask(None, "Tell a long story.", max_new_tokens=1900, ignore_eos=True)
    finally:
        killer.wait()
        signal.signal(signal.SIGINT, previous)
    # The model is still usable afterwards.
    assert m.ask(None, QUESTION, max_new_tokens=2, ignore_eos=True).tokens


def test_expert_ram_gives_the_same_answer_and_counts(models, image):
    full = moellava.Model(models["phi2"], threads=2)
    small = moellava.Model(models["phi2"], threads=2, expert_ram="50%", expert_policy="least-stale")
    assert small.expert_cache is not None and full.expert_cache is None
    assert np.array_equal(full.logits(image, QUESTION), small.logits(image, QUESTION))
    c = small.expert_cache["total"]
    assert c["hits"] + c["misses"] + c["prefetch_hits"] > 0
