# moe-jax: `make test` (the test suite) and `make demo` (the main job).
PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= test
PY := $(VENV)/bin/python
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),_,$(EXTRAS))
PYTEST_ARGS ?= -q -n 2

.PHONY: test demo bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): setup.py | $(PY)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) tests

DEMO_DIR ?= runs/demo

# The main job: instruction-tune a small Flan-MoE model on the bundled sample
# mixture (CPU), evaluate it with seqio, and draw the run report.
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(PY) -m moe_jax.train --gin_file=gin/runs/demo.gin --gin.MODEL_DIR="'$(DEMO_DIR)'"
	$(PY) -m moe_jax.report $(DEMO_DIR)

# The MoE layer and train-step benchmarks (README "Benchmarks").
bench: $(STAMP)
	$(PY) benchmarks/moe_layer.py --tokens 4096 --d_model 512 --d_ff 2048 \
	  --experts 8,32,128 --topk 2 --capacity_factor 1.25 --capacity_scales_with_k \
	  --group_size 1024 --dispatch einsum,sorted,dropless
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
