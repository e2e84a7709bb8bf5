# genmesh: every entry point. `make run` starts the whole mesh; `make test` runs the suite.
# Both set up everything first (virtual environment, pinned dependencies, stubs).

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
PROTOS := $(shell find protos third_party -name '*.proto')
STUBS  := gen/genmesh.pb
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv proto run test bench bench-litellm soak rollout-drill lint fmt k8s-validate images k8s-up k8s-down lock clean

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "genmesh needs Python 3.11 (set PYTHON=/path/to/python3.11)")'
	@echo "==> virtual environment in $(VENV)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) install --quiet --disable-pip-version-check -r requirements-dev.txt -c constraints.txt
	@# The repo root and the generated stubs are importable from anywhere in the venv.
	@$(PY) -c 'import pathlib, site; pathlib.Path(site.getsitepackages()[0], "genmesh.pth").write_text("$(CURDIR)\n$(CURDIR)/gen/python\n")'
	@touch $@

venv: $(STAMP) ## create the virtual environment with pinned dependencies

$(STUBS): $(STAMP) $(PROTOS) scripts/build_protos.py
	@echo "==> stubs and descriptor set from protos/"
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) scripts/build_protos.py

proto: $(STUBS) ## generate Python stubs (.py/.pyi) and Envoy's descriptor set

run: $(STUBS) ## start the whole mesh (PostgreSQL, Redis, simulator, services, Envoy on :8080)
	@$(PY) -m devstack

test: $(STUBS) ## run the whole test suite (unit, integration, end to end)
	@$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STUBS) ## run the load benchmarks against a local mesh and print figures
	@$(PY) -m bench

# LiteLLM's proxy lives in a venv of its own (bench/litellm/requirements.txt, pinned by
# constraints.txt there): its many dependencies never meet the project's.
LITELLM_VENV  := .venv-litellm
LITELLM_STAMP := $(LITELLM_VENV)/.installed

$(LITELLM_STAMP): bench/litellm/requirements.txt bench/litellm/constraints.txt
	@echo "==> LiteLLM's virtual environment in $(LITELLM_VENV)"
	@test -x $(LITELLM_VENV)/bin/python || $(PYTHON) -m venv $(LITELLM_VENV)
	@$(LITELLM_VENV)/bin/pip install --quiet --disable-pip-version-check -r bench/litellm/requirements.txt -c bench/litellm/constraints.txt
	@touch $@

bench-litellm: $(STUBS) $(LITELLM_STAMP) ## the LiteLLM proxy (Redis cache) beside genmesh, measured as make bench does
	@$(PY) -m bench.litellm

soak: $(STUBS) ## steady mixed traffic at half capacity for SOAK_MINUTES (10): errors and RSS
	@$(PY) -m bench.soak

rollout-drill: $(STUBS) ## replace every replica under load as a rolling update does; prints failed requests and p99
	@$(PY) -m devstack.rollout

node_modules/.bin/buf: package.json
	@npm install --no-audit --no-fund --silent
	@touch $@

lint: $(STUBS) node_modules/.bin/buf ## buf lint, ruff, mypy
	@node_modules/.bin/buf lint "-#format=binpb" --config protos/buf.yaml < $(STUBS)
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .
	@$(VENV)/bin/mypy

fmt: $(STAMP) ## format and auto-fix Python
	@$(VENV)/bin/ruff format .
	@$(VENV)/bin/ruff check --fix .

k8s-validate: $(STAMP) ## render the kustomize overlays and validate them offline
	@$(PY) deploy/k8s/validate.py

images: $(STAMP) ## build the images with Podman or Docker (IMAGE_BASE=auto|registry|local|<image>)
	@$(PY) -m deploy.podman.images

k8s-up: $(STAMP) ## run the dev overlay's pods with podman kube play; prints the gateway URL
	@$(PY) -m deploy.podman.kube up

k8s-down: $(STAMP) ## remove everything k8s-up started (pods, secrets, volumes, its database)
	@$(PY) -m deploy.podman.kube down

lock: ## re-pin every transitive dependency after editing requirements*.txt
	@rm -rf $(VENV)/.lock && $(PYTHON) -m venv $(VENV)/.lock
	@$(VENV)/.lock/bin/pip install --quiet -r requirements-dev.txt
	@{ echo "# Every transitive dependency, pinned (pip freeze of requirements-dev.txt). Regenerate with"; \
	   echo "# \`make lock\` after changing requirements*.txt."; \
	   $(VENV)/.lock/bin/pip freeze; } > constraints.txt
	@rm -rf $(VENV)/.lock

clean: ## remove the venv, generated code and local run data
	rm -rf $(VENV) $(LITELLM_VENV) gen .run node_modules .mypy_cache .ruff_cache .pytest_cache
