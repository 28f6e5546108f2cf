# Two commands do all set-up on a fresh machine:  make demo  /  make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HERD := $(VENV)/bin/herd
DEMO_DIR ?= $(VENV)/demo-tiny

.PHONY: demo test install install-test clean

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
	$(PY) -m pytest

demo: $(VENV)/.installed
	$(HERD) info scout
	$(HERD) info maverick
	$(HERD) new tiny $(DEMO_DIR) --seed 0
	@echo "# generation from the random-weight tiny model (the text is noise until herd ships a trained default):"
	$(HERD) generate $(DEMO_DIR) "The herd crossed the river" --max-new-tokens 16 --temperature 0

clean:
	rm -rf $(VENV) build *.egg-info
