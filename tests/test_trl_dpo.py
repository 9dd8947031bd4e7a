"""Our DPO loss against Hugging Face TRL's DPOTrainer, on the published SmolLM2-135M-Instruct.

Why: tests/test_losses.py and tests/test_dpo_learns.py check `dpo_loss` against formulas we wrote
ourselves (a NumPy re-derivation shares our reading of the paper and of TRL). This is an
independent reference: TRL's DPO as users run it, torch + transformers on the same weights
exported with our HF export, so a wrong sign, a missing shift, a mask that counts the prompt or
the padding, a mean over tokens where TRL sums, or a different IPO normalisation shows up here.

Setup: reference = the published weights; policy = the same weights with a fixed perturbation
(float32 noise, 2% of each matrix's std, on every layer's attention output and MLP down
projection), so rewards are non-trivial. Four pairs of the built-in validation set (English and
Chinese, string and message-list prompts; four, to stay near a minute on two CPU cores, where
torch needs ~1 s per sequence pair and forward) are tokenized by our DPO pipeline (`dpo_example`,
the model's own chat template); TRL gets exactly those ids as its pre-tokenized examples
(prompt_ids / chosen_ids / rejected_ids) through its own `DataCollatorForPreference`, and computes
its loss with `DPOTrainer.compute_loss`; its metrics are read back through `DPOTrainer.log`, the
path that writes them to the user's logs. (TRL's own text tokenization of the same pairs is
compared too: it differs from ours only by the newline the template writes after <|im_end|>,
which TRL counts as part of the completion and we do not.)

TRL 1.16 facts this relies on (trl/trainer/dpo_trainer.py): log-probs are summed over the
completion tokens; "sigmoid" is -logsigmoid(beta * h); "ipo" divides each side's log-ratio by
its completion length, then (h - 1/(2 beta))^2 -- the same loss as ours -- but it logs rewards
and logps/* from the *summed* log-ratios / log-probs even for IPO, whereas we log the averaged ones
(as TRL <= 0.11 did), so for IPO the loss and the accuracies are compared with ours, and TRL's
logged IPO rewards with our sigmoid ones (the summed values).
"""
import functools
import math

import jax
import numpy as np
import pytest
import torch
import transformers
import trl
from datasets import Dataset
from trl.trainer.dpo_trainer import DataCollatorForPreference

from geb_jax.checkpoint.published import read_published
from geb_jax.data.demo_tasks import builtin_dpo_pairs
from geb_jax.data.chat_pipeline import dpo_example
from geb_jax.data.pipeline import PipelineStats
from geb_jax.data.tokenizer_files import save_tokenizer
from geb_jax.export.hf import save_hf_checkpoint
from geb_jax.model import make_apply
from geb_jax.train.losses import dpo_loss, dpo_reference_logps

BETA = 0.1
# Of builtin_dpo_pairs("valid"): four tasks, English and Chinese, a message-list prompt (44);
# the perturbed policy prefers the chosen reply in two of them (margins +0.09 and more) and the
# rejected one in the other two (-0.13, -0.20), so rewards/accuracies is 0.5, far from any tie.
PAIRS = (0, 44, 68, 92)
SFT_WEIGHT = 0.5  # our dpo_sft_weight; TRL: loss_type=["sigmoid", "sft"], loss_weights=[1, w]
NOISE = 0.02  # of each perturbed matrix's std
PERTURBED = (("layers", "attn", "o"), ("layers", "mlp", "down"))
LOSS_REL = 1e-4
REWARD_ABS = 2e-4  # rewards are beta * (sums of ~10-30 float32 log-probs)
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
           "logps/rejected")


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def published(smollm2_gguf):
    return read_published(smollm2_gguf)


@pytest.fixture(scope="module")
def policy_params(published):
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda x: x, published.params)  # new dicts, same arrays
    for path in PERTURBED:
        node = params
        for key in path[:-1]:
            node = node[key]
        w = np.asarray(node[path[-1]], np.float32)
        node[path[-1]] = (w + NOISE * w.std() * rng.standard_normal(w.shape)).astype(np.float32)
    return params


@pytest.fixture(scope="module")
def pairs():
    valid = builtin_dpo_pairs("valid")
    chosen = [valid[i] for i in PAIRS]
    assert len({p["task"] for p in chosen}) == len(PAIRS)  # one pair per task
    assert any(not isinstance(p["prompt"], str) for p in chosen)  # a message-list prompt too
    return chosen


@pytest.fixture(scope="module")
def batch(published, pairs):
    """Our pipeline's unpacked DPO batch, padded to the longest sequence (nothing truncated)."""
    tok = published.tokenizer
    longest = max(int(dpo_example(tok, p, 1024)[f"{side}_segment_ids"].sum())
                  for p in pairs for side in ("chosen", "rejected"))
    stats = PipelineStats()
    rows = [dpo_example(tok, p, longest - 1, stats) for p in pairs]  # rows of `longest` tokens
    assert stats.as_dict() == {}, stats
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _sequences(batch, side):
    """[(prompt ids, reply ids)] per row: the unshifted tokens our batch scores."""
    out = []
    for b in range(batch[f"{side}_inputs"].shape[0]):
        tokens = [int(batch[f"{side}_inputs"][b, 0])] + batch[f"{side}_targets"][b].tolist()
        scored = np.flatnonzero(batch[f"{side}_loss_mask"][b])  # target index t = token t + 1
        first, last = int(scored[0]) + 1, int(scored[-1]) + 1
        assert len(scored) == last - first + 1  # one contiguous reply
        out.append((tokens[:first], tokens[first:last + 1]))
    return out


@pytest.fixture(scope="module")
def trl_examples(batch):
    chosen, rejected = _sequences(batch, "chosen"), _sequences(batch, "rejected")
    examples = []
    for (prompt_c, reply_c), (prompt_r, reply_r) in zip(chosen, rejected):
        assert prompt_c == prompt_r
        examples.append({"prompt_ids": prompt_c, "chosen_ids": reply_c, "rejected_ids": reply_r})
    return examples


@pytest.fixture(scope="module")
def hf_folders(published, policy_params, tmp_path_factory):
    root = tmp_path_factory.mktemp("trl_dpo")
    tokenizer = save_tokenizer(published.tokenizer, str(root / "run"))
    folders = {}
    for name, params in (("reference", published.params), ("policy", policy_params)):
        folders[name] = str(root / name)
        save_hf_checkpoint(published.config, params, folders[name], tokenizer_path=tokenizer)
    return folders


@pytest.fixture(scope="module")
def hf_models(hf_folders):
    return {name: transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32).eval() for name, folder in hf_folders.items()}


# ---------------------------------------------------------------------------------- both sides
@pytest.fixture(scope="module")
def ours(published, policy_params, batch):
    """Our metrics; the reference log-probs precomputed into the batch as the DPO stage does."""
    apply = make_apply(published.config)
    reference_logps = jax.jit(functools.partial(dpo_reference_logps, apply=apply),
                              static_argnames="loss_type")
    loss = jax.jit(functools.partial(dpo_loss, apply=apply, beta=BETA),
                   static_argnames="loss_type")
    sft_loss = jax.jit(functools.partial(dpo_loss, apply=apply, beta=BETA, sft_weight=SFT_WEIGHT))
    ref = {t: reference_logps(published.params, batch, loss_type=t) for t in ("sigmoid", "ipo")}
    out = {}
    for name, params, loss_type in (("sigmoid", policy_params, "sigmoid"),
                                    ("ipo", policy_params, "ipo"),
                                    ("first_step", published.params, "sigmoid")):
        _, metrics = loss(params, {**batch, **ref[loss_type]}, loss_type=loss_type)
        out[name] = {k: float(v) for k, v in metrics.items()}
    _, metrics = sft_loss(policy_params, {**batch, **ref["sigmoid"]})
    out["sigmoid_sft"] = {k: float(v) for k, v in metrics.items()}
    return out


def _trl(hf_models, hf_folders, pairs, examples, *, policy, loss_type, tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_folders["reference"])
    weights = [1.0, SFT_WEIGHT] if loss_type == "sigmoid_sft" else None
    loss_types = ["sigmoid", "sft"] if loss_type == "sigmoid_sft" else [loss_type]
    args = trl.DPOConfig(output_dir=str(tmp_path), beta=BETA, loss_type=loss_types,
                         loss_weights=weights,
                         max_length=None, bf16=False, fp16=False, use_cpu=True,
                         report_to="none", per_device_eval_batch_size=len(PAIRS),
                         precompute_ref_log_probs=False, disable_dropout=True)
    text = Dataset.from_list([{"prompt": _messages(p["prompt"]),
                               "chosen": [{"role": "assistant", "content": p["chosen"]}],
                               "rejected": [{"role": "assistant", "content": p["rejected"]}]}
                              for p in pairs])
    # First step (policy == reference): no ref_model, so TRL loads the reference from the policy's
    # folder itself, as in a user's first run.
    ref_model = None if policy == "reference" else hf_models["reference"]
    trainer = trl.DPOTrainer(model=hf_models[policy], ref_model=ref_model,
                             args=args, train_dataset=text, processing_class=tokenizer)
    collator = trainer.data_collator
    assert isinstance(collator, DataCollatorForPreference) and collator.max_length is None
    inputs = collator(examples)
    trainer.model.eval()
    with torch.no_grad():
        loss = float(trainer.compute_loss(trainer.model, inputs))
    logs = {}
    trainer.log(logs)
    metrics = {k[len("eval_"):]: v for k, v in logs.items() if k.startswith("eval_")}
    metrics["loss"] = loss
    return metrics, trainer, inputs


def _messages(prompt):
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


@pytest.fixture(scope="module")
def theirs(hf_models, hf_folders, pairs, trl_examples, tmp_path_factory):
    out = {}
    for name, policy, loss_type in (("sigmoid", "policy", "sigmoid"), ("ipo", "policy", "ipo"),
                                    ("first_step", "reference", "sigmoid"),
                                    ("sigmoid_sft", "policy", "sigmoid_sft")):
        out[name] = _trl(hf_models, hf_folders, pairs, trl_examples, policy=policy,
                         loss_type=loss_type, tmp_path=tmp_path_factory.mktemp("trl_" + name))
    return out


# ---------------------------------------------------------------------------------- tests
def test_trl_scores_exactly_our_tokens(theirs, batch, trl_examples):
    """TRL's collator rebuilds our rows: same ids, same scored (completion) positions."""
    _, _, inputs = theirs["sigmoid"]
    n = len(trl_examples)
    for side, half in (("chosen", slice(0, n)), ("rejected", slice(n, 2 * n))):
        ids, attn = inputs["input_ids"][half].numpy(), inputs["attention_mask"][half].numpy()
        completion = inputs["completion_mask"][half].numpy()
        for b in range(n):
            length = int(attn[b].sum())
            tokens = np.concatenate([batch[f"{side}_inputs"][b, :1], batch[f"{side}_targets"][b]])
            np.testing.assert_array_equal(ids[b, :length], tokens[:length])
            # TRL scores token t+1 where completion_mask[t+1]; we score target t where loss_mask[t]
            np.testing.assert_array_equal(completion[b, 1:], batch[f"{side}_loss_mask"][b])


def test_trl_text_path_differs_only_by_the_newline_after_im_end(theirs, trl_examples,
                                                                published):
    """What TRL itself makes of the same pairs as chat messages: our prompt, and our reply plus
    the "\\n" the template writes after <|im_end|> (TRL scores it, we do not: after <|im_end|>
    the reply is over, and generation stops there)."""
    _, trainer, _ = theirs["sigmoid"]
    newline = published.tokenizer.encode("\n")
    for row, ex in zip(trainer.train_dataset, trl_examples):
        assert row["prompt_ids"] == ex["prompt_ids"]
        assert row["chosen_ids"] == ex["chosen_ids"] + newline
        assert row["rejected_ids"] == ex["rejected_ids"] + newline


def _rel(a, b):
    return abs(a - b) / abs(b)


def _compare(mine, trl_metrics, keys):
    return {k: (mine.get(k), trl_metrics[k]) for k in keys}


def test_sigmoid_dpo_loss_and_metrics_equal_trl(ours, theirs):
    mine, (trl_metrics, _, _) = ours["sigmoid"], theirs["sigmoid"]
    both = _compare(mine, trl_metrics, ("loss", "rewards/accuracies") + METRICS)
    assert mine["pairs"] == len(PAIRS)
    assert 0.0 < mine["rewards/accuracies"] < 1.0  # non-trivial: policy != reference
    assert min(abs(mine["rewards/chosen"]), abs(mine["rewards/rejected"])) > 0.01
    assert _rel(mine["loss"], trl_metrics["loss"]) <= LOSS_REL, both
    assert mine["rewards/accuracies"] == trl_metrics["rewards/accuracies"], both
    for key in METRICS[:3]:
        assert abs(mine[key] - trl_metrics[key]) <= REWARD_ABS, both
    for key in METRICS[3:]:
        assert _rel(mine[key], trl_metrics[key]) <= LOSS_REL, both


def test_first_step_is_log2_with_zero_margins_on_both_sides(ours, theirs):
    mine, (trl_metrics, _, _) = ours["first_step"], theirs["first_step"]
    both = _compare(mine, trl_metrics, ("loss", "rewards/accuracies") + METRICS)
    for metrics in (mine, trl_metrics):
        assert metrics["loss"] == pytest.approx(math.log(2), rel=1e-6), both
        assert metrics["rewards/margins"] == 0.0, both
        assert metrics["rewards/accuracies"] == 0.0, both  # ties are not wins, in TRL and here
    for key in METRICS[3:]:
        assert _rel(mine[key], trl_metrics[key]) <= LOSS_REL, both


def test_ipo_loss_equals_trl(ours, theirs):
    mine, (trl_metrics, _, _) = ours["ipo"], theirs["ipo"]
    both = _compare(mine, trl_metrics, ("loss", "rewards/accuracies") + METRICS)
    assert mine["loss"] > 1.0, both  # (h_avg - 5)^2 with |h_avg| << 5: far from the sigmoid loss
    assert _rel(mine["loss"], trl_metrics["loss"]) <= LOSS_REL, both
    assert mine["rewards/accuracies"] == trl_metrics["rewards/accuracies"], both
    # TRL 1.16 logs IPO's rewards and logps from the summed log-probs, i.e. our sigmoid metrics
    summed = _compare(ours["sigmoid"], trl_metrics, METRICS)
    for key in METRICS[:3]:
        assert abs(ours["sigmoid"][key] - trl_metrics[key]) <= REWARD_ABS, summed
    for key in METRICS[3:]:
        assert _rel(ours["sigmoid"][key], trl_metrics[key]) <= LOSS_REL, summed


def test_dpo_plus_chosen_nll_equals_trl_sigmoid_plus_sft(ours, theirs):
    """sft_weight adds the chosen replies' mean token NLL, as TRL's "sft" loss term does."""
    mine, (trl_metrics, _, _) = ours["sigmoid_sft"], theirs["sigmoid_sft"]
    assert mine["nll/chosen"] > 0.1
    assert mine["loss"] == pytest.approx(ours["sigmoid"]["loss"] + SFT_WEIGHT * mine["nll/chosen"],
                                         rel=1e-6)
    assert _rel(mine["loss"], trl_metrics["loss"]) <= LOSS_REL, (mine["loss"], trl_metrics["loss"])
    assert mine["rewards/accuracies"] == trl_metrics["rewards/accuracies"]

