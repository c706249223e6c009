# The two commands of the README: `make demo` and `make test`.
# Each creates .venv when missing and installs everything it needs first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A torch/torchvision pair known to work together on x86_64 with Python 3.11.
# On a Jetson use the JetPack wheels instead: make TORCH_PINS= ...
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
FMNIST_DIR := /usr/share/datasets/fashion-mnist
DEMO_DIR ?= runs/demo

.PHONY: install fashion-mnist demo test lint bench clean

install: $(VENV)/.installed fashion-mnist

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(strip $(TORCH_PINS)),$(BIN)/python -m pip install --quiet $(TORCH_PINS))
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# Debian ships the full Fashion-MNIST as a package; install it where apt is available.
fashion-mnist:
	@if [ -d $(FMNIST_DIR) ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
		echo "note: no apt-get; put Fashion-MNIST's IDX files in ./data/FashionMNIST/raw"; exit 0; fi; \
	SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist \
		|| echo "warning: could not install dataset-fashion-mnist; the demo needs it"

# The main job on the embedded default: ResNet-18 on real Fashion-MNIST, `cpu` device:
# a short dense training, then DeepLSP prunes it to 60% of its latency measured with ONNX Runtime.
DEMO_BUDGET_RATIO ?= 0.6
demo: install
	$(BIN)/deeplsp train --model resnet18 --dataset fashionmnist --epochs 1 \
		--train-subset 6000 --test-subset 2000 --batch-size 64 \
		--optimizer adamw --lr 1e-3 --weight-decay 0.05 --out $(DEMO_DIR)/dense.pt
	$(BIN)/deeplsp prune --model resnet18 --dataset fashionmnist --checkpoint $(DEMO_DIR)/dense.pt \
		--device cpu --budget-ratio $(DEMO_BUDGET_RATIO) --amount 0.05 --quick --out $(DEMO_DIR)/pruned

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
