# The two commands a newcomer needs:  make serve  and  make test.
# Both create/refresh the virtual environment first (quick when nothing changed).

VENV ?= .venv
BIN := $(VENV)/bin
ADAPTERS ?= $(or $(LORAPLEX_ADAPTERS_DIR),$(HOME)/.cache/loraplex/adapters)
DEMO_TASK := ticket-routing

.PHONY: setup services serve test unit lint bench clean

setup:
	@scripts/setup-env.sh

# Real servers the tests start on loopback (Prometheus), from Debian packages.
services:
	@scripts/install-services.sh

# Serves the base model, the seeded demo adapters and one trained example adapter
# (tasks/ticket-routing, trained once on first run, a few minutes on 2 cores).
serve: setup
	$(BIN)/loraplex model pull
	$(BIN)/loraplex adapters demo --adapters-dir "$(ADAPTERS)"
	@test -f "$(ADAPTERS)/tasks/$(DEMO_TASK)/adapter_model.safetensors" || { \
	  $(BIN)/loraplex train examples/tasks/$(DEMO_TASK)/train.yaml && \
	  mkdir -p "$(ADAPTERS)/tasks" && \
	  cp -r runs/tasks/$(DEMO_TASK) "$(ADAPTERS)/tasks/"; }
	$(BIN)/loraplex serve --adapters-dir "$(ADAPTERS)"

test: setup services lint
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25 tests

unit: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

# Lint rules, the one formatter, and the import rules of DESIGN.md (pyproject.toml).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

# The CPU image loraplex:cpu with podman or docker, whichever runs here; prints build time
# and size (docs/deploy.md). Where no registry can be reached its base comes from Debian's
# packages (scripts/base-image.sh); BASE_IMAGE=python:3.11-slim-bookworm where one can.
.PHONY: image
image:
	@scripts/build-image.sh

bench: setup
	$(BIN)/python bench/router_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info
