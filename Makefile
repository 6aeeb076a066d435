# d2v2scale developer entry points.
#   make venv   create/refresh .venv (torch first, then DeepSpeed without compiled ops, then this package)
#   make test   run the test suite on CPU
#   make demo   short real pretraining: 2 CPU processes via the deepspeed launcher, tiny_image on digits
#   make gpu-check  on a CUDA machine: the gpu-marked tests + planner calibration (bench/gpu_check.py)
#   make clean  remove caches and build artefacts (keeps .venv; `make distclean` removes it too)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.stamp

.PHONY: venv test demo gpu-check clean distclean

venv: $(STAMP)

# torch is installed FIRST and pinned, so nothing later can swap it for a multi-GB CUDA build;
# DeepSpeed is built with DS_BUILD_OPS=0 (pure Python, ops JIT-compiled only if ever used).
# The stamp makes this idempotent; it re-runs when setup.py or this Makefile change.
$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	DS_BUILD_OPS=0 $(PIP) install deepspeed==0.19.8 pyyaml numpy nvidia-ml-py tqdm pytest scikit-learn pillow soundfile matplotlib omegaconf tensorboard mypy==2.4.1 types-PyYAML==6.0.12.20261122
	$(PIP) install nvidia-dali-cuda130==2.4.0  # the CPU-usable DALI wheel: tests run the real pipelines
	$(PIP) install --no-deps -e .
	touch $@

# pytest exits 5 when it collected no tests: treat that as a failure, loudly. --durations: the 25
# slowest tests in the log, and the suite's wall time at the end, to keep its time in check (goal:
# 20 minutes on 2 cores).
test: venv
	@rc=0; start=$$(date +%s); OMP_NUM_THREADS=1 $(PY) -m pytest -q --durations=25 tests || rc=$$?; \
	echo "make test: pytest took $$(( $$(date +%s) - start )) s (goal: 1200 s on 2 cores)"; \
	if [ $$rc -eq 5 ]; then echo "make test: FAILED - pytest collected no tests (exit 5)" >&2; exit 1; fi; \
	exit $$rc

DEMO_RUN ?= runs/demo

# A fresh run directory each time (the previous one is moved aside, never deleted).
demo: venv
	@if [ -e $(DEMO_RUN) ]; then mv $(DEMO_RUN) $(DEMO_RUN).$$(date +%Y%m%d-%H%M%S); fi
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(VENV)/bin/deepspeed --num_gpus 2 launchers/pretrain.py \
		--ds_config ds_configs/cpu_tiny.json --preset tiny_image --run_dir $(DEMO_RUN) --profile
	@echo "run directory: $(DEMO_RUN) (config.yaml, ds_config.json, metrics.jsonl, checkpoints/, report/report.md)"

gpu-check: venv
	$(PY) bench/gpu_check.py --out calibration.json

clean:
	rm -rf .pytest_cache build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
