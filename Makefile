# Both targets create .venv when missing. torch is pinned and installed first: an unpinned torch
# would pull several GB of CUDA wheels.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) training/demo.py

test: venv
	$(PY) -m pytest modeling_tests -q

bench: venv
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) outputs
