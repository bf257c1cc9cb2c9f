# The two commands of the README:
#   make demo   - local Kubernetes cluster + the operator serving a real model
#   make test   - the whole test suite (unit, cluster and end-to-end)
# Every install step lives here or in hack/: a fresh Debian machine needs nothing else.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned to the CPU wheel that lies on this machine's disk; a bare `torch` would pull CUDA builds.
TORCH_SPEC ?= torch==2.13.0

.PHONY: deps venv kube-binaries cluster-up cluster-down cluster-status images kustomize test unit demo clean

deps:
	bash hack/install-deps.sh

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[runtime,gpu,dev]'
	touch $@

venv: $(VENV)/.installed

kube-binaries: deps
	bash hack/build-kubernetes.sh

cluster-up: kube-binaries
	bash hack/cluster.sh start

cluster-down:
	bash hack/cluster.sh stop

cluster-status:
	bash hack/cluster.sh status

images: venv cluster-up
	bash hack/build-images.sh

kustomize:
	bash hack/render-kustomize.sh

unit: venv
	$(PY) -m pytest -m "not cluster" $(PYTEST_ARGS)

test: deps venv kube-binaries
	$(PY) -m pytest $(PYTEST_ARGS)

demo: deps venv kube-binaries
	bash hack/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache
