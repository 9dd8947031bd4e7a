"""The one schema of a run's ConfigDict, with defaults. Presets in configs/ list only differences.

Sections: model (-> ModelConfig), optimizer (-> OptimizerConfig), train (loop lengths, batch),
data, mesh (data/fsdp/tensor sizes, -1 fills the rest), checkpoint, eval, lora, export. Past the
entry point the code reads them typed and frozen: geb_jax/run_config.py `run_config(config)`.
"""
import ml_collections

from geb_jax.errors import ConfigError

placeholder = ml_collections.config_dict.placeholder

# Fields geb_jax.main does not take, and where they act instead (config_loader names this when
# one is given, run_config when a preset sets one).
ELSEWHERE = {
    "data.clean": (
        "data.clean.* configures the cleaning pass, which geb_jax.main does not run (it is a "
        "whole-corpus pass with cross-document dedup and a report, done once, not per training "
        "run): clean first with `python -m geb_jax.data.prepare --config <preset> "
        "--config.data.clean.<field>=<value> --output DIR`, then train on its output with "
        "--config.data.source=local --config.data.path=DIR/documents.jsonl.gz."),
}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "runs/default"  # one folder per stage: checkpoints, metrics.jsonl, TensorBoard
    c.seed = 0
    c.stages = "pretrain"  # comma-separated: pretrain,sft,dpo (train/stages.py)
    c.init_from = ""  # a finished stage's directory to take the first stage's parameters from
    c.mode = "train"  # train | export (geb_jax/export/command.py)

    c.model = ml_collections.ConfigDict(dict(
        vocab_size=4096, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, head_dim=32,
        d_ff=512, max_seq_len=256, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False,
        norm_position="pre", dtype="float32", scan_layers=True, remat_policy="none",
        attention_impl="auto", init_std=0.02,
        loss_chunk_size=512))  # positions per chunk of the lm head + cross-entropy; 0 = dense

    c.optimizer = ml_collections.ConfigDict(dict(
        peak_learning_rate=3e-3, min_learning_rate=3e-4, warmup_steps=20,
        total_steps=placeholder(int),  # None: follows train.steps (run_config.py)
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0, microbatches=1,
        embedding_grad_scale=1.0, decay_embeddings=True))

    c.train = ml_collections.ConfigDict(dict(
        stage="pretrain",  # pretrain | sft | dpo: the loss and batch; the code path is shared
        steps=300, batch_size=8, seq_len=256, log_every=10, z_loss_weight=0.0,
        dpo_beta=0.1, dpo_loss_type="sigmoid", dpo_label_smoothing=0.0,
        dpo_sft_weight=0.0,  # + this x the chosen replies' token NLL (TRL's "sft" loss, RPO)
        skip_batches=""))  # data batches never trained on, e.g. "2300-2500" (train/spikes.py)
    c.train.spike = ml_collections.ConfigDict(dict(  # train/spikes.py SpikeConfig
        policy="skip", loss_factor=2.0, grad_norm_factor=10.0, warmup_steps=20, ema_decay=0.95,
        rewind_skip_batches=100, max_replacements=3, max_rewinds=10,
        inject_batches="", inject_kind="garbage"))

    c.data = ml_collections.ConfigDict(dict(
        source="builtin",  # builtin | local | tfds | pretokenized | mixture (data/sources.py)
        tokenizer="builtin",  # "builtin": a sentencepiece BPE on the built-in corpus; or a path
        shuffle_seed=0,
        path="",  # local: glob of .txt/.jsonl/.jsonl.gz/.parquet; pretokenized: its folder
        valid_path="",  # local: glob for the held-out split; "" = hash split of path
        valid_fraction=0.05,
        field="text",  # local/tfds: JSON key / Parquet column / tfds feature
        txt_unit="file",  # local .txt: one document per "file" or per "paragraph"
        lang="",  # builtin: keep only these ("en,zh"); local/tfds: a tag
        validate=True,  # local: check every record up front, so bad ones are skipped early
        bad_records="skip",  # local: "skip" (and count) malformed records, or "error"
        max_record_bytes=16 * 2**20,  # local: a larger record (e.g. a 50 MB line) is skipped
        tfds_name="", tfds_data_dir="", tfds_train_split="train",
        tfds_valid_split="validation",
        mixture=[],  # [{"source": ..., "weight": w, ...per-source keys above}, ...]
        # SFT / DPO records (data/chat_records.py): "auto" detects the layout per record;
        # or messages | sharegpt | alpaca | prompt_completion (SFT), preference (DPO: TRL's
        # prompt/chosen/rejected, or HH-style chosen/rejected conversations).
        format="auto"))
    # No data.clean here: see ELSEWHERE (data/prepare.py adds its defaults itself).

    # LoRA (model/lora.py): rank 0 trains every weight; rank r > 0 freezes the base and trains
    # rank-r adapters on the named projections (q, k, v, o, gate, up, down).
    c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0,
                                            targets="q,k,v,o,gate,up,down"))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    c.checkpoint = ml_collections.ConfigDict(dict(every=100, keep=3))

    # at_start: also evaluate before the first update of a fresh stage (logged as step 0);
    # suite_at_start: with it, the task suite too (False where the stage before already scored
    # these weights); suite_every: run the task suite only at multiples of it (and first and
    # last), 0 = at every eval.
    c.eval = ml_collections.ConfigDict(dict(every=100, batches=4, at_start=False,
                                            suite_at_start=True, suite_every=0))
    # Task suite run at the same steps (geb_jax/eval/suite.py): "" turns it off; also
    # dpo_preference, sft_exact_match and refusal (generation: minutes on a 100M+ model even
    # with the numpy engine's KV cache), mc:<file.jsonl>.
    c.eval.suite = ml_collections.ConfigDict(dict(
        tasks="perplexity", max_documents=16, stride=0, max_length=0, max_examples=0,
        max_new_tokens=64,
        samples=0, temperature=0.8, shots=0, mc_layout="mmlu", mc_style="letter",
        dpo_beta=0.1, batch_size=8, seed=0))

    c.export = ml_collections.ConfigDict(dict(
        stage="",  # "" = the last of config.stages
        formats="numpy,onnx,gguf,hf",
        onnx_quantize="none,int8,int4",  # one .onnx file each
        onnx_accuracy_level=4,  # quantized MatMul compute: 4 = int8 activations, 0 = float32
        onnx_block_size=0,  # MatMulNBits rows per block; 0 = 32 at int8, 128 at int4
        # plain: standard ONNX ops, any padding side; fused: onnxruntime's GroupQueryAttention
        # + SkipSimplifiedLayerNormalization, packed QKV and gate/up, quantized embedding,
        # batches padded on the right (geb_jax/export/onnx_fused.py)
        onnx_graph="plain",
        gguf_dtypes="f16,q8_0",  # f32 | f16 | q8_0 | q4_0
        out=""))  # "" = <workdir>/export

    # Per-stage differences, nested like the config (run_config.merge_stage merges them; they
    # win over the top-level fields, and the stage's first log line lists what they changed).
    # An unset (None) field is no override: `data` lets one command give each stage its own
    # files, e.g. --config.stage_overrides.sft.data.path='sft/*.jsonl'; an unset
    # optimizer.total_steps follows the stage's own train.steps.
    c.stage_overrides = ml_collections.ConfigDict(dict(
        sft=dict(train=dict(steps=100), optimizer=dict(
            peak_learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=10,
            total_steps=placeholder(int)), data=stage_data_fields()),
        dpo=dict(train=dict(steps=50), optimizer=dict(
            peak_learning_rate=2e-4, min_learning_rate=2e-5, warmup_steps=5,
            total_steps=placeholder(int), weight_decay=0.0), data=stage_data_fields())))
    return c


def stage_data_fields() -> dict:
    """Per-stage data fields, unset unless given (run_config.merge_stage skips None)."""
    return {key: placeholder(str)
            for key in ("source", "path", "valid_path", "format")}


def parse_arg(arg: str | None, **defaults):
    """big_vision-style `get_config(arg)` strings: "key=value,flag" -> typed ConfigDict.

    Each key must be one of `defaults`; values take the default's type; a bare word sets True.
    """
    values = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, raw = item.partition("=")
        if key not in defaults:
            raise ConfigError(f"Unknown config argument {key!r}; known: {sorted(defaults)}.")
        default = defaults[key]
        if not sep:
            values[key] = True
        elif isinstance(default, bool):
            values[key] = raw.lower() in ("1", "true", "yes")
        else:
            values[key] = type(default)(raw)
    return values
