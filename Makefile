# `make test` and `make demo` first run scripts/setup.sh, which installs missing Debian packages
# (with sudo unless run as root) and the project into .venv.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test lint typecheck pytest demo

setup:
	bash scripts/setup.sh

lint: setup
	$(BIN)/ruff check $(wildcard device_sdk tests bench)

typecheck: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/pytest

test: lint typecheck pytest

demo: setup
	$(BIN)/device-sdk demo
