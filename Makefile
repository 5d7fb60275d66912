# `make test` and `make demo` do all the set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo/qwen3_moe

.PHONY: install test test-fast lint demo bench golden coverage clean

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

# The inner loop, under 2 minutes on 2 cores: lint, then every pass over the
# registry (test_every_pass), the contract, the manager, the quicker passes'
# own tests, save/load, golden and the CLI's errors. CI runs make test.
FAST_TESTS := $(addprefix tests/test_,$(addsuffix .py,every_pass contract \
	manager real_inputs report_verify untied_head fuse_qkv last_token \
	save_load golden cli user_pass))
test-fast: lint
	$(VENV)/bin/pytest -q $(FAST_TESTS)

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
