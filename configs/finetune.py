"""Fine-tune a published model on files: SFT then DPO, full or LoRA, measured before and after.

    python -m geb_jax.main --config configs/finetune.py              # SmolLM2-135M-Instruct, full
    python -m geb_jax.main --config configs/finetune.py:lora=16      # LoRA rank 16, all projections
    python -m geb_jax.main --config configs/finetune.py:path=model.gguf,lora=16

The data are the shipped files under geb_jax/data/builtin/finetune/ (data/finetune_files.py:
the built-in bilingual SFT tasks and preference pairs in every common layout: messages,
ShareGPT, Alpaca, prompt/completion; TRL strings, TRL message lists, HH transcripts), read by
the same `data.source=local` path as a user's files; point the stage's data.path elsewhere to
use your own (docs/finetune.md). Each stage is evaluated on held-out data before its first
update (eval.at_start, logged as step 0) and at its end: perplexity on the built-in corpus'
valid split, SFT exact match, DPO preference accuracy, refusal rates on unethical and benign
requests. On 2 otherwise idle CPU cores the full run's stages took 12 (SFT) and 18 (DPO)
minutes, about 3.5 of them evaluation on each side of a stage, before DPO stopped repeating
the SFT stage's final suite at its step 0 (docs/finetune.md has the measured table, full and
LoRA; experiments/finetune_gain.py runs both and writes it).
"""
import os

from configs import pretrained
from geb_jax.config_base import parse_arg
from geb_jax.data import finetune_files

SUITE = "perplexity,sft_exact_match,dpo_preference,refusal"


def get_config(arg=None):
    arg = parse_arg(arg, path="smollm2", lora=0, sft_steps=60, dpo_steps=40, seq_len=256)
    c = pretrained.get_config(f"path={arg.path},seq_len={arg.seq_len}")
    c.stages = "sft,dpo"
    c.workdir = c.workdir + "-finetune" + (f"-lora{arg.lora}" if arg.lora else "")
    files = finetune_files.FINETUNE_DIR
    for stage, train_glob, valid in (("sft", finetune_files.SFT_GLOB, finetune_files.SFT_VALID),
                                     ("dpo", finetune_files.DPO_GLOB, finetune_files.DPO_VALID)):
        c.stage_overrides[stage].data.update(dict(
            source="local", path=os.path.join(files, train_glob),
            valid_path=os.path.join(files, valid), format="auto"))
    # Rates: TRL's defaults for full fine-tuning (SFT 2e-5, DPO 5e-7..5e-6) run short here,
    # so a little higher; LoRA moves a rank-r slice of each matrix and takes ~10x (the PEFT /
    # QLoRA papers' 1e-4..2e-4).
    scale = 10.0 if arg.lora else 1.0
    for stage, steps, peak in (("sft", arg.sft_steps, 5e-5), ("dpo", arg.dpo_steps, 1e-5)):
        c.stage_overrides[stage].train.steps = steps
        c.stage_overrides[stage].optimizer.update(dict(
            peak_learning_rate=peak * scale, min_learning_rate=peak * scale / 10,
            warmup_steps=max(1, steps // 10)))  # total_steps follows the stage's steps
    if arg.lora:
        c.lora.rank, c.lora.alpha = arg.lora, 2.0 * arg.lora
    c.train.log_every = 2
    c.eval.at_start = True
    c.eval.every = c.checkpoint.every = 10
    c.eval.suite_every = 1000  # the suite (minutes: generation) before and after each stage
    c.eval.batches = 8
    c.eval.suite.tasks = SUITE
    c.eval.suite.max_documents = 16
    c.eval.suite.max_length = 512  # perplexity in 512-token windows, not the file's 8192
    c.eval.suite.max_new_tokens = 48
    c.eval.suite.batch_size = 16
    # DPO's held-out reward margin and accuracy curve: the eval split's DPO metrics (the loss
    # on data.valid_path pairs against the reference) every 10 steps.
    # Its step-0 suite is skipped: the SFT stage's final suite scored the same weights.
    c.stage_overrides.dpo.eval = dict(every=10, suite_at_start=False)
    # DPO + the chosen replies' NLL (TRL's loss_type=["sigmoid", "sft"], RPO): plain DPO here
    # raised held-out preference accuracy to 0.98 but pushed rejected replies down more than
    # it lifted chosen ones, and greedy replies to unethical requests refused less, not more.
    c.stage_overrides.dpo.train.dpo_sft_weight = 1.0
    # Every pair fits in 128 tokens (about 100 at most in SmolLM2's template); 8 pairs a step.
    c.stage_overrides.dpo.train.update(dict(seq_len=128, batch_size=8))
    c.export.gguf_dtypes = "f16,q8_0"
    return c
