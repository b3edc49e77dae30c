# The two commands a newcomer needs:  make serve  and  make test.
# Both create/refresh the virtual environment first (quick when nothing changed).

VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup serve test unit lint bench clean

setup:
	@scripts/setup-env.sh

serve: setup
	$(BIN)/loraplex model pull
	$(BIN)/loraplex adapters demo
	$(BIN)/loraplex serve

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

unit: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/router_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info
