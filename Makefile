# Every target creates .venv and installs the package with the pinned constraints when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export MUJOCO_GL ?= egl

LINT_PATHS := deqmpc_gym tests benchmarks examples

.PHONY: demo lint test test-slow bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[test,reference,cluster]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m deqmpc_gym.cli demo --out results/demo

# ruff (rules and complexity limit in pyproject.toml) and mypy (its [tool.mypy] settings) on the package
lint: $(STAMP)
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m mypy deqmpc_gym

# mpc.pytorch (no dependencies of its own needed) for the tests of the solver suite's comparison with it
MPC_PYTORCH := mpc==0.0.6

test: $(STAMP) lint
	$(PY) -m pip install -q --no-deps $(MPC_PYTORCH)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) -m pip install -q --no-deps $(MPC_PYTORCH)  # mpc.pytorch, for the solver comparison
	$(PY) benchmarks/envs.py
	$(PY) benchmarks/solver.py
	$(PY) benchmarks/al_floor.py
	$(PY) benchmarks/policy.py
	$(PY) benchmarks/act_ablation.py
	$(PY) benchmarks/training.py
	$(PY) benchmarks/kernels.py
	$(PY) benchmarks/batch_scaling.py
	$(PY) benchmarks/experts.py
	$(PY) benchmarks/video.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
