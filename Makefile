# The two commands of the README: `make demo` (install, then the main job) and
# `make test` (install, then the test suite). Both install into ./.venv first.
PY := .venv/bin/python
export DS_ACCELERATOR ?= cpu
export PYTHONUNBUFFERED := 1

.PHONY: install demo test
install:
	bash tools/setup_machine.sh

demo: install
	$(PY) -m pldr_dist.demo

# Two pytest-xdist workers: the SLURM tests, which mostly wait, overlap with the CPU-bound ones
# (tests/conftest.py groups the tests; TEST_WORKERS=0 runs them in this one process).
# A test still running after TEST_TIMEOUT seconds (the slowest take ~75 s here) has hung: its
# threads' stacks are printed and its worker ends, so the suite reports it and goes on.
TEST_WORKERS ?= 2
TEST_TIMEOUT ?= 600
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --timeout=$(TEST_TIMEOUT) --timeout-method=thread tests
