"""Bad inputs raise the package's exceptions with the CLI's messages."""

import pytest

import moellava
from conftest import ROOT, checkpoint


def test_exception_hierarchy():
    for e in (moellava.FormatError, moellava.ModelError, moellava.ImageError):
        assert issubclass(e, moellava.Error) and issubclass(e, Exception)


def test_missing_and_broken_model_files(tmp_path):
    with pytest.raises(moellava.FormatError, match="nope.gguf"):
        moellava.Model(tmp_path / "nope.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(moellava.FormatError, match="junk.gguf"):
        moellava.Model(junk)


def test_bad_options_are_value_errors(models):
    with pytest.raises(ValueError, match="threads"):
        moellava.Model(models["phi2"], threads=0)
    with pytest.raises(ValueError, match="kv_cache"):
        moellava.Model(models["phi2"], kv_cache="f8")
    with pytest.raises(ValueError, match="expert_policy"):
        moellava.Model(models["phi2"], expert_ram="50%", expert_policy="random")
    with pytest.raises(ValueError, match="prefetch needs expert_ram"):
        moellava.Model(models["phi2"], prefetch=True)
    with pytest.raises(moellava.ModelError, match="belady"):
        moellava.Model(models["phi2"], expert_ram="50%", expert_policy="belady")
    with pytest.raises(moellava.ModelError, match="cuda"):
        moellava.Model(models["phi2"], device="cuda")
    m = moellava.Model(models["phi2"], threads=1)
    with pytest.raises(ValueError, match="temperature"):
        m.ask(None, "Hi", temperature=-1.0)


def test_bad_images(models, tmp_path):
    m = moellava.Model(models["phi2"], threads=1)
    with pytest.raises(moellava.ImageError, match="missing.png"):
        m.ask(tmp_path / "missing.png", "What is it?")
    with pytest.raises(moellava.ImageError):
        m.ask(b"\x89PNG but not really", "What is it?")
    with pytest.raises(TypeError, match="image must be"):
        m.ask(12345, "What is it?")


def test_prompt_beyond_the_context_is_a_model_error(models):
    m = moellava.Model(models["qwen"], threads=1)
    n = m.info["context_length"]
    with pytest.raises(moellava.ModelError, match="context length"):
        m.ask(None, "Hi", max_new_tokens=n + 1)


def test_convert_errors(tmp_path):
    with pytest.raises(moellava.FormatError):
        moellava.convert(tmp_path / "no-checkpoint", tmp_path / "out.gguf")
    with pytest.raises(ValueError, match="q3_k"):
        moellava.convert(checkpoint("phi2") / "model", tmp_path / "out.gguf", experts="q3_k")
    assert not (tmp_path / "out.gguf").exists()
