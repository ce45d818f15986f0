"""Install moe-jax (the framework, `moe_jax`) and its task registry (`moe_jax_tasks`)."""

import setuptools

setuptools.setup(
    name="moe-jax",
    version="0.1.0",
    description=(
        "Sparse Mixture-of-Experts encoder-decoder models in JAX/Flax, "
        "t5x-style, with the Flan 2022 seqio registry."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=(
        setuptools.find_packages(include=["moe_jax", "moe_jax.*"])
        + ["moe_jax_tasks"]
        # Namespace packages too: the sample data's directories are packages of
        # data files for setuptools (listed, they install without warnings).
        + [
            "moe_jax_tasks." + p
            for p in setuptools.find_namespace_packages(where="tasks")
            if "__pycache__" not in p
        ]
    ),
    package_dir={"moe_jax_tasks": "tasks"},
    package_data={
        "moe_jax_tasks": ["catalog/*.txt", "catalog/*.tsv", "sample/**/*"],
        "moe_jax.kernels": ["*.cc"],  # Compiled on first use (moe_jax/kernels/cpu_gmm.py).
    },
    include_package_data=True,
    install_requires=[
        "jax>=0.5,<0.12",
        "flax>=0.10,<0.14",
        "optax>=0.2.3,<0.4",
        "orbax-checkpoint>=0.10,<0.14",
        "gin-config>=0.5,<0.6",
        "seqio>=0.0.19",
        "tensorflow-cpu>=2.16,<2.23",
        "tensorflow-text>=2.16,<2.23",
        "tensorflow-datasets>=4.9,<4.11",
        "clu>=0.0.12",
        "tensorboard>=2.16",  # clu's TensorBoard writer imports it.
        "matplotlib>=3.8",  # The run report's figures.
        "sentencepiece>=0.2",
        "msgpack>=1.0",  # t5x checkpoints (moe_jax/convert/t5x.py).
        "tensorstore>=0.1.51",
        "numpy>=1.26",
        "scipy-openblas32>=0.3.27",  # BLAS of the CPU grouped-matmul kernels.
    ],
    extras_require={
        # filelock: the locks of jax's compilation cache, which tests/conftest.py turns on.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "filelock>=3.12"],
        "hf": ["torch==2.13.0", "transformers>=4.44,<6", "safetensors>=0.4"],
        "tpu": ["jax[tpu]>=0.5,<0.12"],
        "gpu": ["jax[cuda12]>=0.5,<0.12", "tokamax>=0.0.12"],
        # lm-evaluation-harness adapter (moe_jax/lm_eval.py); torch pinned as in `hf`
        # so nothing pulls a CUDA build.
        "lm-eval": ["lm-eval>=0.4.13,<0.5", "torch==2.13.0"],
    },
    entry_points={
        # Harnesses that discover plugins find `--model moe_jax` without the wrapper.
        "lm_eval.models": ["moe_jax = moe_jax.lm_eval:MoeJaxLM"],
    },
)
