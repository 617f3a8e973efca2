# `make test` and `make demo` first run scripts/setup.sh, which installs missing Debian packages
# (with sudo unless run as root) and the project into .venv.
VENV := .venv
BIN := $(VENV)/bin
LINT_PATHS := $(wildcard device_sdk tests bench)

.PHONY: setup test lint typecheck pytest demo

setup:
	bash scripts/setup.sh

lint: setup
	$(BIN)/ruff check $(LINT_PATHS)

typecheck: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/pytest

# All three checks run even when one fails, so a single run shows every problem.
test: setup
	@failed=""; \
	echo "$(BIN)/ruff check $(LINT_PATHS)"; $(BIN)/ruff check $(LINT_PATHS) || failed="$$failed ruff"; \
	echo "$(BIN)/mypy"; $(BIN)/mypy || failed="$$failed mypy"; \
	echo "$(BIN)/pytest"; $(BIN)/pytest || failed="$$failed pytest"; \
	if [ -n "$$failed" ]; then echo "make test: failed:$$failed" >&2; exit 1; fi

demo: setup
	$(BIN)/device-sdk demo
