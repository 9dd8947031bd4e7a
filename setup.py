"""geb_jax: pretrain, SFT and DPO small Llama-family models in JAX, then serve them on CPUs."""
from setuptools import find_packages, setup

# Direct dependencies are bounded to the minor series we test; constraints.txt pins the
# whole resolved set so a fresh install resolves the same way tomorrow.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "tensorflow-datasets>=4.9.10,<4.10",
    "sentencepiece>=0.2.3,<0.3",
    "ml-collections>=1.1.0,<1.2",
    "grain>=0.2.18,<0.3",
    "numpy>=2.2,<2.5",
    "absl-py>=2.1,<3",
    "tqdm>=4.66,<5",
    "safetensors>=0.4,<0.9",
    "tensorboardX>=2.6,<3",
    "pyarrow>=26.0.1,<27",
    "datasketch>=2.0.0,<2.1",  # MinHash LSH near-duplicate removal
]

TEST_REQUIRES = [
    "pytest>=8,<10",
    # Reference implementations the tests compare against (CPU build of torch).
    "torch==2.13.0",
    "transformers>=5.23.0,<5.24",
    "onnx>=1.23.2,<1.24",
    "onnxruntime>=1.32.0,<1.33",
]

setup(
    name="geb_jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=find_packages(include=["geb_jax", "geb_jax.*"]),
    include_package_data=True,
    package_data={"geb_jax": ["data/builtin/*", "data/clean/*.txt"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
)
