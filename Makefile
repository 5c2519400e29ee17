# fastpilot — every target is a command the README shows.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 5000

# llama.cpp is compiled from the llama-cpp-python sdist: native CPU code, no
# tests/examples/tools/server, no curl. The install is skipped entirely when the
# venv already imports a good build.
#
# AMX is compiled out: on an Intel Xeon with AMX (Sapphire Rapids) ggml's AMX
# matmul in this release segfaults inside llama_decode on Q4_K_M models (seen on
# the tiny test models: ggml_backend_amx_mul_mat, SIGSEGV). Explicit -mno-amx-*
# flags win over -march=native in GCC and Clang; they are x86-only flags.
# A venv holding an AMX build (or pip's cached wheel of one) is rebuilt.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CMAKE_ARGS  ?= -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
                     -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF -DGGML_BLAS=OFF
ifneq ($(filter x86_64 amd64 i686,$(shell uname -m)),)
LLAMA_CFLAGS ?= -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
endif
LLAMA_OK := import llama_cpp, sys; \
	sys.exit(llama_cpp.__version__ != '$(LLAMA_CPP_VERSION)' or b'AMX_INT8 = 1' in llama_cpp.llama_print_system_info())

.PHONY: install convert serve test test-slow bench lint clean-models

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel

install: $(BIN)/python
	@if $(BIN)/python -c "$(LLAMA_OK)" 2>/dev/null; then \
		echo "llama-cpp-python $(LLAMA_CPP_VERSION) already built in $(VENV)"; \
	else \
		$(BIN)/pip uninstall -q -y llama-cpp-python 2>/dev/null || true; \
		CFLAGS="$(LLAMA_CFLAGS)" CXXFLAGS="$(LLAMA_CFLAGS)" \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
			$(BIN)/pip install --no-cache-dir "llama-cpp-python==$(LLAMA_CPP_VERSION)"; \
	fi
	$(BIN)/pip install -q -e ".[dev]"

# MODELS="1558M codegen2-3.7B" converts just those (opt-in ones included); empty: the default set.
MODELS ?=
convert: install
	$(BIN)/python -m conversion.convert_all $(if $(strip $(MODELS)),--only "$(MODELS)")

serve: convert
	$(BIN)/fastpilot serve --host $(HOST) --port $(PORT)

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/pip install -q -e ".[dev,bench]"
	$(BIN)/python -m benchmarks.run

lint: install
	$(BIN)/ruff check fastpilot conversion tests benchmarks
	$(BIN)/ruff format --check fastpilot conversion tests benchmarks
	$(BIN)/mypy fastpilot conversion

clean-models:
	rm -rf models
