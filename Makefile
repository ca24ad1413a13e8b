# lafam-serve: the README's commands. `make demo` and `make test` create the virtualenv themselves.
# GPU hosts: make install EXTRAS=gpu,dev  (onnxruntime-gpu instead of the CPU build; never both)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= cpu,dev
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install demo test test-fast bench soak eval eval-vit lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py handlers/_png.c
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	$(BIN)/lafam-serve demo

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not e2e and not slow"

bench: install
	$(BIN)/python -m benchmarks.lafam_overhead --write benchmarks/RESULTS.md
	$(BIN)/python -m benchmarks.explain_speed --write benchmarks/RESULTS.md
	$(BIN)/python -m benchmarks.distribution_quality --write benchmarks/RESULTS.md
	$(BIN)/python -m benchmarks.architectures --write benchmarks/RESULTS.md
	$(BIN)/python -m benchmarks.serving --write benchmarks/RESULTS.md
	$(BIN)/python -m benchmarks.engines --write benchmarks/RESULTS.md
	$(BIN)/python -m benchmarks.soak --write benchmarks/RESULTS.md

# The 10-minute mixed-load soak alone (also part of bench).
soak: install
	$(BIN)/python -m benchmarks.soak --write benchmarks/RESULTS.md

# Scores every served explanation method on generated scenes with exact masks (README "Evaluation").
eval: install
	test -f model_store/shapes.mar || $(BIN)/python -c "from pathlib import Path; from demo.run import build_demo_archive; build_demo_archive(Path('out'), Path('model_store'))"
	$(BIN)/lafam-serve eval --archive model_store/shapes.mar --out results/eval

# The same evaluation of the demo ViT (demo/vit.py; a fixed 128x128 input, so its grids are resized to it).
eval-vit: install
	test -f model_store/shapes_vit.mar || $(BIN)/python -c "from pathlib import Path; from demo.vit import build_vit_archive; build_vit_archive(Path('out'), Path('model_store'))"
	$(BIN)/lafam-serve eval --archive model_store/shapes_vit.mar --out results/eval_vit

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf out model_store/*.mar .pytest_cache
