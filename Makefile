# `make test` and `make demo` first run scripts/setup.sh, which installs missing Debian packages
# (with sudo unless run as root) and the project into .venv.
VENV := .venv
BIN := $(VENV)/bin
LINT_PATHS := $(wildcard device_sdk tests bench hil)
# The hardware-in-the-loop scenarios on the simulated bench (SoftHSM, swtpm, firmware-shim
# simulator), report in reports/hil; docs/hil.md shows a bench of real boards.
HIL := $(BIN)/pytest hil --rig hil/sim-rig.toml --report-dir reports/hil

.PHONY: setup test lint typecheck pytest hil demo

setup:
	bash scripts/setup.sh

lint: setup
	$(BIN)/ruff check $(LINT_PATHS)

typecheck: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/pytest

hil: setup
	$(HIL)

# All four checks run even when one fails, so a single run shows every problem.
test: setup
	@failed=""; \
	echo "$(BIN)/ruff check $(LINT_PATHS)"; $(BIN)/ruff check $(LINT_PATHS) || failed="$$failed ruff"; \
	echo "$(BIN)/mypy"; $(BIN)/mypy || failed="$$failed mypy"; \
	echo "$(BIN)/pytest"; $(BIN)/pytest || failed="$$failed pytest"; \
	echo "$(HIL)"; $(HIL) || failed="$$failed hil"; \
	if [ -n "$$failed" ]; then echo "make test: failed:$$failed" >&2; exit 1; fi

demo: setup
	$(BIN)/device-sdk demo
