# streamcanvas: `make serve` sets everything up and runs the server; `make test` sets up and runs the suite.
# Everything goes into a virtual environment at .venv; nothing is installed system-wide.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.streamcanvas-installed

# torch is pinned to the CPU build of 2.13.0. An unpinned `torch` (or one that another package pulls in)
# resolves to a multi-GB CUDA build, so torch is installed first, on its own, and everything after it
# sees the requirement already met. On this project's machines pip finds the CPU wheel on local disk
# through its configured find-links; elsewhere pass pip the CPU wheel index of PyTorch, e.g.
#   make serve TORCH_PIP_ARGS="--index-url <PyTorch CPU wheel index>"
# (or a CUDA index of the same version on a GPU machine).
TORCH_VERSION := 2.13.0
TORCH_PIP_ARGS ?=

SERVE_ARGS ?=
PYTEST_ARGS ?=

# System packages come from Debian's archive: npm (if the machine has no Node.js) for the page's one
# browser dependency, Chromium for the browser tests, and redis-server and PostgreSQL for the batch
# queue's tests. Installed only when missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq
WEB_STAMP := web_static/node_modules/.package-lock.json

.PHONY: setup serve test bench clean browser redis postgresql toy-weights

setup: $(STAMP) $(WEB_STAMP)

$(WEB_STAMP): web_static/package.json web_static/package-lock.json
	command -v npm >/dev/null || { $(SUDO) apt-get update -qq && $(APT_INSTALL) npm; }
	cd web_static && npm ci --silent

browser:
	command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(APT_INSTALL) chromium fonts-dejavu-core; }

# The batch queue's Redis deployment is tested against a real redis-server (started by the tests on a
# loopback port; Debian's service is not started).
redis:
	command -v redis-server >/dev/null || { $(SUDO) apt-get update -qq && $(APT_INSTALL) redis-server; }

# ... and against a real PostgreSQL (the job database of a queue spanning machines), a throwaway
# cluster the tests start themselves.
postgresql:
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(APT_INSTALL) postgresql; }

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) "torch==$(TORCH_VERSION)"
	$(BIN)/python -c "import torch; print('torch', torch.__version__, '(CUDA build)' if torch.version.cuda else '(CPU build)')"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# streamdiffusion 0.1.1 pins diffusers==0.24, which no longer imports beside a current huggingface_hub;
	# its pipeline core works with current diffusers, so it is installed without its pins.
	$(BIN)/python -m pip install --quiet --no-deps "streamdiffusion==0.1.1"
	touch $(STAMP)

serve: setup
	$(BIN)/streamcanvas serve $(SERVE_ARGS)

test: setup browser redis postgresql
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Retrain the toy model's shipped weights (pipelines/toy_weights) after its recipe or plan changed;
# the test suite retrains them too and checks that it gets the same weights.
toy-weights: setup
	$(BIN)/streamcanvas make-tiny-model --train --retrain pipelines/toy_weights

bench: setup
	$(BIN)/python -m streamcanvas.benchmarks.backends
	$(BIN)/python -m streamcanvas.benchmarks.realtime_ws
	$(BIN)/python -m streamcanvas.benchmarks.batch_queue
	$(BIN)/python -m streamcanvas.benchmarks.live_with_batch
	$(BIN)/python -m streamcanvas.benchmarks.multi_session
	$(BIN)/python -m streamcanvas.benchmarks.live_controls

clean:
	rm -rf $(VENV) artifacts .pytest_cache web_static/node_modules
