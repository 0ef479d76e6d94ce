# The README's two commands: `make demo` and `make test`. Both create .venv when it is
# missing and (re)install the project when pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_output

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# DeepSpeed compiles its shared-memory collectives for CPU ranks at their first process group
	# (~28 s, kept in ~/.cache/torch_extensions): done here, not inside the first demo's or test's
	# training stage; DeepSpeed builds nothing on a GPU machine.
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m flows.demo --out $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest

# Unit tests only (no process launches or training): a quick inner loop while developing.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .hypothesis
