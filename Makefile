# Two commands do everything on a fresh Debian machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
FASHION_MNIST := $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The persistent JAX compilation cache makes a second run start fast.
export SPP_JAX_CACHE_DIR ?= $(CURDIR)/.cache/jax
PYTEST_ARGS ?=

.PHONY: install data test demo demo-test detect-demo samples lock clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements-lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77,<81"
	$(PY) -m pip install -q -c requirements-lock.txt -e '.[test]'
	touch $(STAMP)

# Debian ships the original Fashion-MNIST idx files; the embedded data set is built from them.
data: $(FASHION_MNIST)

$(FASHION_MNIST):
	$(SUDO) apt-get update -q
	$(SUDO) apt-get install -y -q dataset-fashion-mnist

test: install data
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install data
	$(PY) -m spp_jax.main --config configs/demo.py --workdir workdirs/demo

# SPP-net detection on embedded Fashion-MNIST scenes, against the R-CNN path (minutes).
detect-demo: install data
	$(PY) -m spp_jax.main --config configs/detect_demo.py --workdir workdirs/detect_demo

# The demo as a test, with its loose accuracy bound (minutes; also part of `make test`).
demo-test: install data
	$(PY) -m pytest -q tests/test_train_demo.py

# The sample grid shown in the README.
samples: install data
	$(PY) experiments/make_samples.py --config small

# Refresh the pinned versions after a deliberate upgrade.
lock: install
	$(PY) -m pip freeze --exclude-editable > requirements-lock.txt

clean:
	rm -rf $(VENV) .cache .pytest_cache workdirs
