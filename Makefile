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

# The main job: train MVAM on the built-in synthetic benchmark, evaluate, write the hub-ready
# folder, then reload it with AutoModel in a fresh process and check its metrics.
demo: venv
	$(PY) training/run.py --output_dir outputs/mvam-synthetic --overwrite_output_dir
	$(PY) training/check_folder.py outputs/mvam-synthetic

test: venv
	$(PY) -m pytest modeling_tests -q

bench: venv
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) outputs
