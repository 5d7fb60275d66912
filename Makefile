# `make test` and `make demo` do all the set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo/qwen3_moe

.PHONY: install test lint demo bench golden coverage clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# setuptools warns on every editable install that folders may shadow it
	PYTHONWARNINGS=ignore $(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest -q

demo: install
	$(PY) -m graphpatch.testing.zoo qwen3_moe $(DEMO_DIR)
	$(VENV)/bin/graphpatch apply --passes fuse_glu,last_token $(DEMO_DIR)

bench: install
	$(PY) benchmarks/fuse_glu.py
	$(PY) benchmarks/last_token.py

# Regenerate docs/COVERAGE.md (every architecture of the installed mlx-lm)
# and the README's list, which comes from it.
coverage: install
	$(VENV)/bin/graphpatch coverage --write docs/COVERAGE.md > /dev/null
	$(PY) -m graphpatch.testing.coverage --readme README.md docs/COVERAGE.md

# Re-record golden/ on purpose (new mlx, mlx-lm or pass); review the diff.
golden: install
	$(PY) -c "from graphpatch.testing.zoo import record_zoo; record_zoo('golden', 'build/golden-zoo')"

clean:
	rm -rf $(VENV) demo build *.egg-info
