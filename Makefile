# moellava — the two commands a newcomer needs:
#   make demo   convert the bundled model, ask it about a picture (grows with the project)
#   make test   every test: Rust unit/integration tests plus the Python-backed cross-checks
# Both run `make setup` first, which installs what a fresh Debian/Ubuntu machine lacks.

SHELL := /bin/bash
VENV  := .venv
PY    := $(abspath $(VENV))/bin/python
BUILD := build
SUDO  := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CARGO_TEST_FLAGS ?=
# The Python extension is built by maturin, not by `cargo test` (a test binary cannot link it).
CARGO_TEST := cargo test --workspace --exclude moellava-python $(CARGO_TEST_FLAGS)

export MOELLAVA_PYTHON := $(PY)

.PHONY: setup test demo golden-check fuzz-check cuda-check gpu-bundle python-test serve-test fixtures clean-build

setup: $(BUILD)/.apt-ok $(VENV)/.requirements-ok

# cmake and libclang build ggml and its bindings (llama-cpp-sys-2); python3-venv for the checks;
# headless chromium + chromedriver for the web page's test.
$(BUILD)/.apt-ok:
	@mkdir -p $(BUILD)
	@if ! command -v cmake >/dev/null || ! command -v clang >/dev/null || ! dpkg -s libclang-dev >/dev/null 2>&1 \
	    || ! python3 -c 'import ensurepip, venv' 2>/dev/null || ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  echo "setup: installing cmake clang libclang-dev python3-venv chromium chromium-driver"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq cmake clang libclang-dev python3-venv chromium chromium-driver >/dev/null; \
	fi
	@touch $@

$(VENV)/.requirements-ok: tools/requirements.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -r tools/requirements.txt
	@touch $@

test: setup
	MOELLAVA_REQUIRE_PYTHON=1 $(CARGO_TEST)
	$(MAKE) --no-print-directory golden-check fuzz-check cuda-check python-test serve-test

# The Python package: a wheel built by maturin (dev profile: the tests use tiny models), installed into
# the venv and tested against the CLI; then installed into a fresh venv to prove the wheel stands alone.
WHEELS := $(BUILD)/wheels
python-test: setup
	@# The CLI the tests compare with, built as `cargo test` builds it (a plain `cargo build` unifies
	@# features differently and would recompile dependencies).
	$(CARGO_TEST) --no-run --quiet
	@rm -rf $(WHEELS) $(BUILD)/fresh-venv
	$(VENV)/bin/maturin build --quiet --manifest-path python/Cargo.toml --profile dev --compatibility linux --out $(WHEELS)
	$(PY) -m pip install -q --disable-pip-version-check --force-reinstall --no-deps $(WHEELS)/moellava-*.whl
	cd python/tests && MOELLAVA_BIN=$(abspath target/debug/moellava) $(PY) -m pytest -q -p no:cacheprovider .
	python3 -m venv $(BUILD)/fresh-venv
	$(BUILD)/fresh-venv/bin/pip install -q --disable-pip-version-check $(WHEELS)/moellava-*.whl
	cd /tmp && $(abspath $(BUILD))/fresh-venv/bin/python -c 'import moellava; print("fresh venv: moellava", moellava.__version__, "imports")'

# `moellava serve` against the official openai client, malformed requests, a bounded load test and the
# page in headless Chromium (screenshot: build/serve-page.png).
serve-test: setup
	$(CARGO_TEST) --no-run --quiet
	cd tests/serve && MOELLAVA_BIN=$(abspath target/debug/moellava) $(PY) -m pytest -q -p no:cacheprovider .

# The quant golden files must be exactly what the pinned gguf-py writes today.
golden-check: setup
	@rm -rf $(BUILD)/golden-quant
	$(PY) tools/gen_quant_golden.py $(BUILD)/golden-quant
	diff -r $(BUILD)/golden-quant tests/fixtures/quant
	@echo "golden-check: tests/fixtures/quant matches gguf-py $$($(PY) -c 'import importlib.metadata as m; print(m.version("gguf"))')"

# Every CUDA kernel file must compile with NVRTC (the venv's nvidia-cuda-nvrtc-cu12 wheel; no GPU
# needed) and define every kernel the Rust side launches. The GPU tests (tests/cuda_backend.rs) run in
# `cargo test` and skip, printing why, on a machine without a GPU.
cuda-check: setup
	MOELLAVA_REQUIRE_NVRTC=1 MOELLAVA_NVRTC="$$(ls -d $(abspath $(VENV))/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib | head -1)" \
	  $(CARGO_TEST) --test cuda_compile -- --nocapture

# What tools/gpu_check.sh needs on a lent GPU machine (no Rust there, no network): the release CLI,
# the GPU test binary and gen_random_model, stripped and gzipped into .gpu/ (about 11 MB, so that the
# working tree plus .gpu stays under the device tool's 64 MiB). The test models are made there, by
# tools/gen_checkpoint.py (numpy only) and the carried CLI.
GPU_BUNDLE := .gpu
gpu-bundle: setup
	cargo build --release -p moellava --bin moellava
	cargo build --release -p moellava-gen-random-model
	@rm -rf $(GPU_BUNDLE) && mkdir -p $(GPU_BUNDLE)
	exe=$$(cargo test --release --test cuda_backend --no-run --message-format=json 2>/dev/null \
	  | $(PY) -c 'import sys, json; [print(m["executable"]) for m in map(json.loads, sys.stdin) if m.get("executable") and m["target"]["name"] == "cuda_backend"]'); \
	  strip -o $(GPU_BUNDLE)/cuda_backend "$$exe"
	strip -o $(GPU_BUNDLE)/moellava target/release/moellava
	strip -o $(GPU_BUNDLE)/gen_random_model target/release/moellava-gen-random-model
	gzip -9 $(GPU_BUNDLE)/cuda_backend $(GPU_BUNDLE)/moellava $(GPU_BUNDLE)/gen_random_model
	@du -sh $(GPU_BUNDLE); echo "carry .gpu and run: bash tools/gpu_check.sh (the working tree + .gpu must stay under 64 MiB)"

# The fuzz target must keep compiling (running it: see fuzz/README.md).
fuzz-check:
	CARGO_TARGET_DIR=$(abspath target) cargo check --quiet --manifest-path fuzz/Cargo.toml

# Regenerates tests/fixtures/model (PyTorch reference; ~4 GB of wheels on first use; CI never runs it),
# checks that a second run writes identical bytes, and runs the reference's self-test.
REF_VENV := .venv-reference
REF_PY   := $(abspath $(REF_VENV))/bin/python
fixtures:
	@test -x $(REF_PY) || python3 -m venv $(REF_VENV)
	@DS_BUILD_OPS=0 $(REF_PY) -m pip install -q --disable-pip-version-check -r tools/reference/requirements.txt
	$(REF_PY) tools/reference/make_fixtures.py tests/fixtures
	rm -rf $(BUILD)/fixtures-again && $(REF_PY) tools/reference/make_fixtures.py $(BUILD)/fixtures-again
	diff -r tests/fixtures/model $(BUILD)/fixtures-again/model && diff -r tests/fixtures/images $(BUILD)/fixtures-again/images
	$(REF_PY) tools/reference/selftest.py tests/fixtures

# The demo: the model the project trained (models/moellava-toy) converted at three quant plans, one picture
# described and questioned with each, then POPE on the held-out split with each and the comparison.
TOY  := models/moellava-toy
DEMO := $(BUILD)/demo
MOELLAVA := ./target/release/moellava
demo: setup
	cargo build --release --quiet
	@mkdir -p $(DEMO)
	$(MOELLAVA) convert $(TOY)/model -o $(DEMO)/toy-f16.gguf --type f16 --force --quiet
	$(MOELLAVA) convert $(TOY)/model -o $(DEMO)/toy-q8_0.gguf --type f16 --experts q8_0 --force --quiet
	$(MOELLAVA) convert $(TOY)/model -o $(DEMO)/toy-q4.gguf --preset q4 --force --quiet
	$(MOELLAVA) inspect $(DEMO)/toy-q4.gguf | tail -n 12
	@for plan in f16 q8_0 q4; do \
	  echo "== $$plan: $(TOY)/example.png"; \
	  $(MOELLAVA) run -m $(DEMO)/toy-$$plan.gguf --image $(TOY)/example.png -p "Describe the image." --max-new-tokens 32 || exit 1; \
	  $(MOELLAVA) run -m $(DEMO)/toy-$$plan.gguf --image $(TOY)/example.png -p "Is there a red circle in the image?" --max-new-tokens 16 || exit 1; \
	done
	@for plan in f16 q8_0 q4; do \
	  rm -rf $(DEMO)/pope-$$plan; \
	  $(MOELLAVA) pope -m $(DEMO)/toy-$$plan.gguf --question-file $(TOY)/pope/llava_pope_test.jsonl \
	    --image-folder $(TOY)/pope/images --annotation-dir $(TOY)/pope/coco --out $(DEMO)/pope-$$plan || exit 1; \
	done
	$(MOELLAVA) compare $(DEMO)/pope-f16 $(DEMO)/pope-q8_0 $(DEMO)/pope-q4 --png $(DEMO)/pope-compare.png
	@echo "chart: $(DEMO)/pope-compare.png"

clean-build:
	rm -rf $(BUILD)
