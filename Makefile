# Two entry points: `make run` (the CIFAR-10 study) and `make test` (the whole suite).
# Both create the virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# torchvision (the model zoo in tests/test_zoo.py and benchmarks/zoo.py) loads only beside the torch it
# was built with: on x86_64 PyPI's torch 2.14.1 + torchvision 0.29.1 (a CUDA build, about 5.5 GB in the
# venv; it runs on the CPU), on aarch64 torch 2.9.1 + torchvision 0.24.1 (a CPU build, about 0.7 GB).
ARCH := $(shell uname -m)
ifeq ($(ARCH),aarch64)
TORCH_PIN ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
endif
# The shared CIFAR-10 copy, when this checkout sits beside it; INTQ_DATA or --data override it.
export INTQ_DATA ?= $(firstword $(wildcard ../shared/data/cifar10-jpeg))

.PHONY: run test venv clean
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[all,dev]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/intq run $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .cache runs
