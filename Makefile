# Two entry points: `make run` (the CIFAR-10 study) and `make test` (the whole suite).
# Both create the virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 (CPU build) lies on this machine's disk; pinning it avoids a multi-GB CUDA download.
TORCH_PIN ?= torch==2.13.0
# The shared CIFAR-10 copy, when this checkout sits beside it; INTQ_DATA or --data override it.
export INTQ_DATA ?= $(firstword $(wildcard ../shared/data/cifar10-jpeg))

.PHONY: run test venv clean
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH_PIN)'
	$(PY) -m pip install -q -e '.[all,dev]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/intq run $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .cache runs
