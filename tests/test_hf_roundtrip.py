"""HF Llama checkpoints <-> geb_jax, checked against transformers' LlamaForCausalLM (CPU, fp32).

Both directions are judged by logits on random tokens, so a transposed or mis-grouped tensor
cannot hide. Weights (norm scales included) are randomized well away from HF's init so every
tensor matters. Models are tiny (2 layers, d <= 64) to keep the file fast.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from geb_jax.export import hf  # noqa: E402
from geb_jax.errors import ConfigError  # noqa: E402
from geb_jax.model import ModelConfig, abstract_params, make_apply

TOL = 1e-4
B, T = 2, 16

HF_CASES = {  # random small LlamaConfigs: MHA, GQA, MQA, tied/untied, theta/eps, odd head_dim
    "mha_untied": dict(vocab_size=97, hidden_size=32, num_attention_heads=4,
                       num_key_value_heads=4, intermediate_size=64),
    "gqa_tied": dict(vocab_size=150, hidden_size=48, num_attention_heads=6, num_key_value_heads=3,
                     intermediate_size=96, tie_word_embeddings=True),
    "mqa_theta_eps": dict(vocab_size=300, hidden_size=64, num_attention_heads=4,
                          num_key_value_heads=1, intermediate_size=80, rope_theta=500000.0,
                          rms_norm_eps=1e-6),
    "head_dim_16": dict(vocab_size=120, hidden_size=32, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, intermediate_size=64),
}


def _hf_model(seed: int, **kwargs):
    """A HF Llama with weights randomized (norms around 1, not exactly 1) in eval mode."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(num_hidden_layers=2, max_position_embeddings=64,
                                      attn_implementation="eager", **kwargs)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens)).logits.numpy()


def _our_logits(config: ModelConfig, params, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(make_apply(config)(params, jnp.asarray(tokens)))


def _tokens(vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (B, T)).astype(np.int64)


def _random_params(config: ModelConfig, seed: int = 0):
    """Random params in our tree (shapes from abstract_params), norm scales around 1.

    Not init_params: its uncompiled flax init costs ~10 s a call on a busy 2-core machine.
    """
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: rng.normal(0.0, 0.15, a.shape).astype(np.float32),
                          abstract_params(config))
    for node in (params["layers"]["attn_norm"], params["layers"]["mlp_norm"],
                 params["final_norm"]):
        node["scale"] = 1.0 + 0.3 * rng.standard_normal(node["scale"].shape).astype(np.float32)
    return params


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---- HF -> geb_jax -----------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_checkpoint_loads_with_matching_logits(case, tmp_path):
    kwargs = HF_CASES[case]
    model = _hf_model(seed=sorted(HF_CASES).index(case), **kwargs)
    model.save_pretrained(tmp_path, safe_serialization=True)
    config, params = hf.load_hf_checkpoint(str(tmp_path))

    assert config.n_kv_heads == kwargs["num_key_value_heads"]
    assert config.tie_embeddings == kwargs.get("tie_word_embeddings", False)
    assert config.rope_theta == kwargs.get("rope_theta", 10000.0)
    assert config.head_dim == kwargs.get(
        "head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
    # Same tree (names, shapes) as our own init, so training code can take these params.
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, abstract_params(config))

    tokens = _tokens(kwargs["vocab_size"])
    diff = np.abs(_our_logits(config, params, tokens) - _hf_logits(model, tokens)).max()
    print(f"{case}: HF -> geb_jax max |logit diff| = {diff:.2e}")
    assert diff <= TOL


def test_bfloat16_checkpoint_loads_as_float32(tmp_path):
    model = _hf_model(seed=7, **HF_CASES["mha_untied"]).to(torch.bfloat16)
    model.save_pretrained(tmp_path, safe_serialization=True)
    config, params = hf.load_hf_checkpoint(str(tmp_path))
    expected = model.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T  # (F, D)
    assert params["layers"]["mlp"]["down"].dtype == np.float32
    np.testing.assert_array_equal(params["layers"]["mlp"]["down"][1], expected)


# ---- geb_jax -> HF -----------------------------------------------------------------------

@pytest.mark.parametrize("tied, max_shard_bytes", [(False, None), (True, 8192)])
def test_saved_checkpoint_loads_in_transformers(tied, max_shard_bytes, tmp_path):
    config = ModelConfig(vocab_size=131, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2,
                         head_dim=8, d_ff=72, max_seq_len=64, rope_theta=50000.0, norm_eps=1e-6,
                         tie_embeddings=tied, init_std=0.15)
    params = _random_params(config, seed=int(tied))
    path = str(tmp_path / "export")
    hf.save_hf_checkpoint(config, params, path, max_shard_bytes=max_shard_bytes)

    if max_shard_bytes:  # sharded: index + several shards, no single-file weights
        with open(os.path.join(path, hf.INDEX_FILE)) as f:
            shards = set(json.load(f)["weight_map"].values())
        assert len(shards) > 1
        assert sorted(os.listdir(path)) == sorted([*shards, "config.json", hf.INDEX_FILE])
    else:
        assert sorted(os.listdir(path)) == ["config.json", hf.WEIGHTS_FILE]
    with open(os.path.join(path, "config.json")) as f:
        assert hf.model_config_from_hf(json.load(f)) == config  # the config survives the trip
    loaded_config, loaded = hf.load_hf_checkpoint(path)
    assert loaded_config == config
    _assert_trees_equal(loaded, params)  # and back, bit-exact

    model = transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    assert model.config.tie_word_embeddings == tied
    tokens = _tokens(config.vocab_size, seed=1)
    diff = np.abs(_our_logits(config, params, tokens) - _hf_logits(model, tokens)).max()
    print(f"tied={tied} shards={max_shard_bytes}: geb_jax -> HF max |logit diff| = {diff:.2e}")
    assert diff <= TOL


def test_save_is_atomic_and_refuses_to_overwrite(tiny_config, tmp_path, monkeypatch):
    params = _random_params(tiny_config, 0)
    path = tmp_path / "ckpt"

    def fail(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(safetensors.numpy, "save_file", fail)
        with pytest.raises(OSError, match="disk full"):
            hf.save_hf_checkpoint(tiny_config, params, str(path))
    assert os.listdir(tmp_path) == []  # neither the target nor a temporary folder is left

    hf.save_hf_checkpoint(tiny_config, params, str(path))
    with pytest.raises(hf.CheckpointError, match="overwrite=True"):
        hf.save_hf_checkpoint(tiny_config, params, str(path))
    other = _random_params(tiny_config, 1)
    hf.save_hf_checkpoint(tiny_config, other, str(path), overwrite=True)
    assert os.listdir(tmp_path) == ["ckpt"]
    _assert_trees_equal(hf.load_hf_checkpoint(str(path))[1], other)


# ---- errors ------------------------------------------------------------------------------

def _llama_dict(tiny_config, **changes):
    return {**hf.hf_config_from_model_config(tiny_config), **changes}


@pytest.mark.parametrize("changes, field", [
    (dict(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}),
     "rope_parameters.rope_type"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(model_type="mistral"), "model_type"),
    (dict(architectures=["MistralForCausalLM"]), "architectures"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_unsupported_hf_features_name_the_field(tiny_config, changes, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        hf.model_config_from_hf(_llama_dict(tiny_config, **changes))


def test_transformers_rope_scaling_config_is_refused():
    """What transformers 5 itself writes for a linear-scaled model (it lands in rope_parameters)."""
    scaling = {"rope_type": "linear", "factor": 2.0}
    hf_dict = transformers.LlamaConfig(rope_scaling=scaling).to_dict()
    with pytest.raises(ConfigError, match="rope_type='linear'"):
        hf.model_config_from_hf(hf_dict)


def test_old_style_config_reads_top_level_rope_theta(tiny_config):
    hf_dict = _llama_dict(tiny_config, rope_parameters=None, rope_scaling=None, rope_theta=1234.0)
    assert hf.model_config_from_hf(hf_dict, dtype="bfloat16") == tiny_config.replace(
        rope_theta=1234.0, dtype="bfloat16")


def _rewrite_weights(path, edit):
    file = os.path.join(path, hf.WEIGHTS_FILE)
    state = safetensors.numpy.load_file(file)
    edit(state)
    safetensors.numpy.save_file(state, file, {"format": "pt"})


@pytest.fixture
def saved(tiny_config, tmp_path):
    path = str(tmp_path / "ckpt")
    hf.save_hf_checkpoint(tiny_config, _random_params(tiny_config, 0), path)
    return path


def test_missing_tensor_is_named(saved):
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite_weights(saved, lambda s: s.pop(name))
    with pytest.raises(hf.CheckpointError, match=rf"{name}.*\(16, 32\).*model\.safetensors"):
        hf.load_hf_checkpoint(saved)


def test_wrongly_shaped_tensor_names_tensor_and_shapes(saved):
    name = "model.layers.0.mlp.up_proj.weight"
    _rewrite_weights(saved, lambda s: s.update({name: np.zeros((63, 32), np.float32)}))
    with pytest.raises(hf.CheckpointError) as info:
        hf.load_hf_checkpoint(saved)
    message = str(info.value)
    assert all(part in message for part in (name, "(63, 32)", "(64, 32)", hf.WEIGHTS_FILE))


def test_unexpected_tensor_is_named_but_inv_freq_is_ignored(saved):
    _rewrite_weights(saved, lambda s: s.update(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}))
    hf.load_hf_checkpoint(saved)
    _rewrite_weights(saved, lambda s: s.update(
        {"model.layers.2.mlp.up_proj.weight": np.ones((64, 32), np.float32)}))
    with pytest.raises(hf.CheckpointError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        hf.load_hf_checkpoint(saved)


def test_tied_checkpoint_may_carry_a_copy_of_the_embedding_only(tiny_config, tmp_path):
    config = tiny_config.replace(tie_embeddings=True)
    path = str(tmp_path / "tied")
    hf.save_hf_checkpoint(config, _random_params(config), path)
    _rewrite_weights(path, lambda s: s.update({"lm_head.weight": s["model.embed_tokens.weight"]}))
    hf.load_hf_checkpoint(path)
    _rewrite_weights(path, lambda s: s.update({"lm_head.weight": s["lm_head.weight"] + 1.0}))
    with pytest.raises(hf.CheckpointError, match="lm_head.weight.*tie_word_embeddings"):
        hf.load_hf_checkpoint(path)


def test_missing_files_name_the_folder(tiny_config, tmp_path):
    with pytest.raises(hf.CheckpointError, match="nowhere does not exist"):
        hf.load_hf_checkpoint(str(tmp_path / "nowhere"))
    with pytest.raises(hf.CheckpointError, match="No config.json.*empty"):
        os.makedirs(tmp_path / "empty")
        hf.load_hf_checkpoint(str(tmp_path / "empty"))

    path = str(tmp_path / "noweights")
    hf.save_hf_checkpoint(tiny_config, _random_params(tiny_config, 0), path)
    os.remove(os.path.join(path, hf.WEIGHTS_FILE))
    with pytest.raises(hf.CheckpointError, match="model.safetensors.*noweights"):
        hf.load_hf_checkpoint(path)

    path = str(tmp_path / "shards")
    hf.save_hf_checkpoint(tiny_config, _random_params(tiny_config, 0), path,
                          max_shard_bytes=8192)
    shard = sorted(f for f in os.listdir(path) if f.startswith("model-"))[-1]
    os.remove(os.path.join(path, shard))
    with pytest.raises(hf.CheckpointError, match=shard):
        hf.load_hf_checkpoint(path)


def test_post_norm_model_cannot_be_exported(tiny_config):
    with pytest.raises(ConfigError, match="norm_position"):
        hf.hf_config_from_model_config(tiny_config.replace(norm_position="post"))
