from pathlib import Path

from setuptools import find_namespace_packages, setup

setup(
    name="megaseg",
    version="0.1.0",
    description="Segment-level reward models and dense-reward PPO (RLHF) on megatron-core",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # Namespace discovery so resource folders (megaseg/resources/data/...) are packaged without __init__.py.
    packages=find_namespace_packages(include=["megaseg", "megaseg.*"], exclude=["*.__pycache__"]),
    package_data={"megaseg": ["resources/**/*"]},
    include_package_data=True,
    install_requires=[
        # Install torch first (scripts/setup_env.sh pins the CPU wheel); any recent torch satisfies this.
        "torch>=2.4",
        # 0.16.1 is the newest for Python 3.11; clusters on Python 3.12 get newer releases.
        "megatron-core>=0.16.1",
        "omegaconf>=2.3",
        "numpy>=1.24",
        "scikit-learn>=1.3",
        "transformers>=4.46",
        "tokenizers>=0.20",
        "datasets>=2.19",
        "safetensors>=0.4",
        "gguf>=0.10",
        "tqdm>=4.66",
        "tensorboard>=2.15",
        "matplotlib>=3.7",
        # dist_checkpointing.save needs it but megatron-core does not declare it.
        "psutil>=5.9",
        "pyyaml>=6",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]>=1.12", "flash-attn>=2.6"],
        "wandb": ["wandb>=0.17"],
        # The benchmarks' own loaders, for the tests of `megaseg generate` / `compare` (optional for users).
        # fastchat.llm_judge imports anthropic and accelerate without declaring them; alpaca_eval imports
        # pkg_resources, which setuptools removed in 81.
        "eval": ["alpaca_eval>=0.6", "fschat>=0.2.36", "anthropic", "accelerate", "setuptools<81"],
        # The Triton kernels of megaseg/kernels (config `kernels: auto|triton|torch`). GPU torch wheels bring their
        # own pinned triton; on CPU the tests run the kernels in Triton's interpreter (TRITON_INTERPRET=1).
        "kernels": ["triton>=3.2"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "triton>=3.2"],
    },
    entry_points={"console_scripts": ["megaseg=megaseg.cli:main"]},
)
