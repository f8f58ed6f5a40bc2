# Two commands set everything up on a machine that has only Python and make:
#   make demo   create .venv, install, run the main example end to end
#   make test   create .venv, install with test extras, run the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel

# keras-hub for its tests, without its dependencies: they would replace tensorflow-cpu with the
# full tensorflow and add tensorflow-text (600+ MB), neither of which keras-hub needs to build
# and run GPT2Backbone / BertBackbone. Its other requirements come in the second line. Users get
# everything with `pip install keras-surgery[hub]`.
$(STAMP): $(BIN)/python setup.cfg pyproject.toml Makefile
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps keras-hub==0.32.0
	$(BIN)/python -m pip install --quiet regex "kagglehub!=1.0.1" kagglesdk==0.1.28 sentencepiece \
		tokenizers
	touch $(STAMP)

install: $(STAMP)

demo: install
	KERAS_BACKEND=tensorflow TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python examples/quickstart.py

test: install
	$(BIN)/python -m ruff check .
	KERAS_BACKEND=tensorflow TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python -m pytest -q

bench: install
	KERAS_BACKEND=tensorflow TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python benchmarks/bench_five.py \
		--json benchmarks/results_five.json
	KERAS_BACKEND=tensorflow TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python benchmarks/bench_scaling.py \
		--json benchmarks/results_scaling.json --plot benchmarks/scaling.png

lint: install
	$(BIN)/python -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
