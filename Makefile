# Two entry points for a fresh machine: `make demo` (the main job on a generated tiny
# gpt-oss checkpoint) and `make test` (the whole suite). Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is pinned in setup.cfg's [hf] extra: that exact version has a CPU wheel on these machines.
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[hf,test]'
	touch $@

.PHONY: install demo test fuzz
install: $(VENV)/.installed

demo: install
	$(VENV)/bin/gptoss-convert demo --workdir demo-out

test: install
	$(PY) -m pytest -n 2 -q

# The property-based fuzzing of the untrusted-input parsers (tests/test_fuzz.py) at length:
# GPTOSS_FUZZ_EXAMPLES examples per property (the normal suite runs 40).
FUZZ_EXAMPLES ?= 5000
fuzz: install
	GPTOSS_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/test_fuzz.py -q
