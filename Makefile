# The two commands of the README: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines pin torch to the local CPU build; GPU users: see README ("GPU").
CONSTRAINTS ?= constraints.txt
DEMO_OUT ?= runs/demo

.PHONY: setup demo demo-text test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[test]'
	touch $@

# The duplicated-data regime first (a model that generalizes and copies its 10 duplicated
# images; MLP neurons by activation-contrast, the configuration that beats random pruning at
# equal quality there, docs/results.md), then the global memorizer (64 images, copies nearly
# everything; heads by the default taylor-gap), then the
# text-to-image default on 300 samples (its memorized prompts): three full reports, < 10 min.
demo: setup
	$(BIN)/dit-prune run checkpoints/digits-duplicated --out $(DEMO_OUT)/duplicated --scorer activation-contrast --budget-mode neurons --budget 60 --random-budgets 10,20,40,80,160 --overwrite
	$(BIN)/dit-prune run checkpoints/digits-memorized --out $(DEMO_OUT)/memorized --budget 0.2,0.1 --random-budgets 0.1,0.2,0.3 --overwrite
	$(BIN)/dit-prune run checkpoints/digits-text --out $(DEMO_OUT)/text --budget 2 --seeds 0-299 --overwrite

# The text-to-image default at full size (1,000 samples, three budgets): about 13 min on the
# shared 2-core machine (docs/text_to_image.md).
demo-text: setup
	$(BIN)/dit-prune run checkpoints/digits-text --out $(DEMO_OUT)/text --budget 2,1,3 --overwrite

test: setup
	$(BIN)/ruff check dit_prune tests scripts benchmarks
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check dit_prune tests scripts benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
