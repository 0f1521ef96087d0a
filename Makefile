# Two set-up commands: `make demo` and `make test` (README). Everything else is a helper.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: install kernels demo test test-fast lint chromium clean bench server-up server-down

install: $(STAMP)

# torch==2.13.0 first where no GPU is present: it is the CPU build, and the project's open range
# then installs nothing more (a plain `torch` or an open range alone pulls a CUDA build of several GB)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q 'torch>=2.4'; \
	else $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# Triton on a machine without a GPU: tests/test_kernels.py runs the CUDA kernels in its interpreter
# (3.9: 3.6's cannot run them); a GPU machine keeps the Triton its torch build pins
KERNELS := $(VENV)/.kernels
kernels: $(KERNELS)
$(KERNELS): $(STAMP)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q triton==3.9.0; fi
	touch $(KERNELS)

demo: install
	LANGPWT_HOME=$${LANGPWT_HOME:-.langpwt/demo} $(BIN)/langpwt demo

chromium:
	@command -v chromium >/dev/null 2>&1 || command -v /usr/bin/chromium >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

test: install kernels chromium lint
	$(BIN)/python -m pytest -q -ra --durations=25

# names that do not exist fail here on CPU, before a GPU-only code path would have found them. Only files
# git tracks: a scratch file in a clone must not fail the suite; outside a git checkout (an unpacked
# tarball), every file. Tracked files deleted in the work tree are skipped.
lint: install
	if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
	  git ls-files -z -- '*.py' | xargs -0 -r sh -c 'for f; do [ -e "$$f" ] && printf "%s\0" "$$f"; done; true' _ \
	    | xargs -0 -r $(BIN)/ruff check --force-exclude; \
	else $(BIN)/ruff check .; fi

test-fast: install kernels
	$(BIN)/python -m pytest -q -ra -m "not slow"

bench: install
	$(BIN)/python benchmarks/pipeline_bench.py --repeats 3 --pairs 6 --floor

# a local Prefect server, the work pools, every deployment in prefect.yaml and a CPU worker (README)
server-up: install
	$(BIN)/langpwt server up --deploy

server-down:
	$(BIN)/langpwt server down

clean:
	rm -rf $(VENV) .langpwt .pytest_cache
