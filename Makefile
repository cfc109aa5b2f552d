# The two commands a user needs: `make demo` and `make test`.
# Both build .venv from nothing when it is missing (CPU torch first, then the package).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= demo_out
# pytest workers (pytest-xdist): one per core, each with one torch thread (tests/conftest.py). Tests
# marked xdist_group("name") run in one worker (loadgroup): they share a session fixture's model.
TEST_WORKERS ?= auto

.PHONY: demo test lint venv clean bench

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: a CPU build where one lies on local disk; otherwise pip fetches it.
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/voxdiff demo --out $(DEMO_OUT)

test: venv lint
	@# pytest exits 5 when it collected nothing: treat that as a failure too.
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --maxprocesses=4 --dist loadgroup tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$rc

# Static checks, run before the tests (a finding fails `make test`): ruff (config in pyproject.toml)
# and mypy on voxdiff/core.
lint: venv
	$(PY) -m ruff check voxdiff tests benchmarks
	$(PY) -m mypy voxdiff/core

bench: venv
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache .mypy_cache
