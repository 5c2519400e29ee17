# fastpilot — every target is a command the README shows.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 5000

# llama.cpp is compiled from the llama-cpp-python sdist: native CPU code, no
# tests/examples/tools/server, no curl. pip keeps the built wheel in its cache,
# and the install is skipped entirely when the venv already imports it.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CMAKE_ARGS  ?= -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
                     -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF -DGGML_BLAS=OFF

.PHONY: install convert serve test test-slow bench lint clean-models

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel

install: $(BIN)/python
	@if $(BIN)/python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$(LLAMA_CPP_VERSION)')" 2>/dev/null; then \
		echo "llama-cpp-python $(LLAMA_CPP_VERSION) already built in $(VENV)"; \
	else \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
			$(BIN)/pip install "llama-cpp-python==$(LLAMA_CPP_VERSION)"; \
	fi
	$(BIN)/pip install -q -e ".[dev]"

convert: install
	$(BIN)/python -m conversion.convert_all

serve: convert
	$(BIN)/fastpilot serve --host $(HOST) --port $(PORT)

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/python -m benchmarks.run

lint: install
	$(BIN)/ruff check fastpilot conversion tests benchmarks
	$(BIN)/ruff format --check fastpilot conversion tests benchmarks
	$(BIN)/mypy fastpilot conversion

clean-models:
	rm -rf models
