# Two commands set everything up on a machine that has only Python and make:
#   make demo   create .venv, install, run the main example end to end
#   make test   create .venv, install with test extras, run the tests (TensorFlow, JAX, PyTorch)
# `make dist` builds the sdist and the wheel into dist/ and checks their metadata.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every install is held to the versions CI was proven with (setup.cfg's requirements stay open).
CONSTRAINTS := constraints.txt
PIP_INSTALL := $(BIN)/python -m pip install --quiet -c $(CONSTRAINTS)
TF_ENV := KERAS_BACKEND=tensorflow TF_CPP_MIN_LOG_LEVEL=3

.PHONY: install demo test lint bench dist clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip setuptools wheel

# keras-hub for its tests, without its dependencies: they would replace tensorflow-cpu with the
# full tensorflow and add tensorflow-text (600+ MB), neither of which keras-hub needs to build
# and run GPT2Backbone / BertBackbone. Its other requirements come in the second line. Users get
# everything with `pip install keras-surgery[hub]`.
# torch: the constraint (2.13.0) is what keeps pip on the CPU build; see constraints.txt.
$(STAMP): $(BIN)/python setup.cfg pyproject.toml $(CONSTRAINTS) Makefile
	$(PIP_INSTALL) -e ".[test,tensorflow,jax,torch]"
	$(PIP_INSTALL) --no-deps keras-hub==0.32.0
	$(PIP_INSTALL) regex "kagglehub!=1.0.1" kagglesdk==0.1.28 sentencepiece tokenizers
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(TF_ENV) $(BIN)/python examples/quickstart.py

# The whole suite on TensorFlow (the sweep over every keras.applications constructor as its
# own step); on JAX and PyTorch all but the tests marked tensorflow_only.
test: install
	$(BIN)/python -m ruff check .
	$(TF_ENV) $(BIN)/python -m pytest -q -m "not applications_sweep"
	$(TF_ENV) $(BIN)/python -m pytest -q -m applications_sweep tests/test_all_applications.py
	KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python -m pytest -q -m "not tensorflow_only and not slow_on_other_backends"
	KERAS_BACKEND=torch TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python -m pytest -q -m "not tensorflow_only and not slow_on_other_backends"

bench: install
	$(TF_ENV) $(BIN)/python benchmarks/bench_five.py --json benchmarks/results_five.json
	$(TF_ENV) $(BIN)/python benchmarks/bench_scaling.py \
		--json benchmarks/results_scaling.json --plot benchmarks/scaling.png
	$(TF_ENV) $(BIN)/python benchmarks/bench_graph.py
	$(TF_ENV) $(BIN)/python benchmarks/bench_layers.py --json benchmarks/results_layers.json
	$(BIN)/python benchmarks/bench_billion.py --json benchmarks/results_billion.json
	$(TF_ENV) $(BIN)/python benchmarks/bench_growth_lm.py --json benchmarks/results_growth_lm.json
	$(TF_ENV) $(BIN)/python benchmarks/bench_growth_lm.py --family gpt2 \
		--json benchmarks/results_growth_lm_gpt2.json

lint: install
	$(BIN)/python -m ruff check .

# PEP 517 builds in an isolated environment (held to the same constraints), then the metadata
# and the README as rendered on the package index are checked.
dist: install
	rm -rf dist
	PIP_CONSTRAINT=$(CURDIR)/$(CONSTRAINTS) $(BIN)/python -m build --quiet --outdir dist .
	$(BIN)/python -m twine check --strict dist/*

clean:
	rm -rf $(VENV) build dist *.egg-info
