# Two entry points: `make demo` (install + quickstart run) and `make test` (install + test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install install-dev bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e '.[export,stream,serve,sweep]' -c constraints.txt

install-dev: $(BIN)/python
	$(BIN)/pip install -q -e '.[dev,export,stream,sweep,serve,medical,peft]' -c constraints.txt

demo: install
	$(BIN)/vittune finetune recipes/quickstart.yaml

# Two test processes: the CLI tests spend most of their time in one-thread subprocesses.
test: install-dev
	WANDB_MODE=offline $(BIN)/python -m pytest -n 2

lint: install-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/mae_step.py
	$(BIN)/python benchmarks/distill_step.py
	$(BIN)/python benchmarks/dataloader.py
	$(BIN)/python benchmarks/cache.py
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/end_to_end.py
