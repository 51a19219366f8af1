# vitresize: `make demo` to see it work, `make test` to run the tests. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := build/demo
N      ?= 5000
SEED   ?= 0

.PHONY: install demo test test-slow fuzz bench bench-quick bench-huge fidelity fidelity-update pictures install-cow-tools lint format fixtures clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	@mkdir -p $(DEMO)
	$(BIN)/vitresize inspect fixtures/timm_vit_cls.pth
	$(BIN)/vitresize convert fixtures/timm_vit_cls.pth $(DEMO)/vit_48.safetensors --img-size 48 --force
	$(BIN)/vitresize convert fixtures/deit_distilled.pth $(DEMO)/deit_p4.pth --patch 4 --force
	$(BIN)/vitresize convert fixtures/families/hf_vit $(DEMO)/hf_vit_48 --img-size 48 --force

test: install
	$(BIN)/pytest

# The slow tests (the timm architecture survey, the full fuzz set, the kernel sweeps: ~1 min; a wheel installed into
# a fresh venv: ~1-2 min, ~6 GB of temporary disk); pytest's exit code 5 (none collected) is not a failure.
test-slow: install
	$(BIN)/pytest -m slow || [ $$? -eq 5 ]

# The long fuzz run: N mutated fixtures through inspect + convert --verify, in worker processes.
fuzz: install
	$(BIN)/python tests/fuzzing.py --cases $(N) --seed $(SEED)

# Speed and memory against cp / import torch / the timm route, same run (files under ~/.cache/vitresize-bench).
bench: install
	$(BIN)/python benchmarks/bench.py

bench-quick: install
	$(BIN)/python benchmarks/bench.py --quick

# Scale check (not in CI): a sparse ViT-22B-sized (~87 GB) safetensors file, peak RSS must stay flat.
bench-huge: install
	$(BIN)/python benchmarks/bench.py --huge

# Accuracy kept without fine-tuning, per method and target (not in CI): trains small ViTs on scikit-learn's digits,
# converts and evaluates them, and compares with the committed benchmarks/fidelity/ (fidelity-update rewrites it).
fidelity: install
	$(BIN)/python benchmarks/fidelity.py

fidelity-update: install
	$(BIN)/python benchmarks/fidelity.py --update

# The README's example pictures (docs/img/), from the fidelity benchmark's trained ViT (trained if not cached).
pictures: install
	$(BIN)/python benchmarks/pictures.py

# The copy-on-write file systems tests/test_cow.py loop-mounts (as root; it skips without them).
install-cow-tools:
	apt-get update -qq && apt-get install -y -qq xfsprogs btrfs-progs

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

fixtures: install
	$(BIN)/python fixtures/make_fixtures.py
	$(BIN)/python fixtures/make_families.py

clean:
	rm -rf build .pytest_cache .ruff_cache .mypy_cache
