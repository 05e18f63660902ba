"""ByteTokenizer and chat-template rendering: pure Python, no model files."""

import json

import pytest

from kvserve.model.tokenizer import ByteTokenizer, ChatTemplate, ChatTemplateError, HFTokenizer, Tokenizer

# A Hugging Face-style ChatML template: loop, loop.first, raise_exception, tojson, add_generation_prompt.
CHATML = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ bos_token }}<|im_start|>system\nDefault system.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_byte_tokenizer_satisfies_protocol_shape():
    tokenizer: Tokenizer = ByteTokenizer()
    assert tokenizer.vocab_size == 260
    assert tokenizer.eos_token_ids == frozenset({257})
    assert tokenizer.bos_token_id == 256


@pytest.mark.parametrize("text", ["", "hello", "naïve café", "日本語", "emoji 😀👍🏽", "a\nb\tc  "])
def test_byte_tokenizer_round_trip(text):
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert ids[0] == ByteTokenizer.BOS
    assert ids[1:] == list(text.encode("utf-8"))
    assert tokenizer.encode(text, add_special_tokens=False) == ids[1:]
    assert tokenizer.decode(ids) == text


def test_byte_tokenizer_partial_utf8_decodes_to_replacement_char():
    tokenizer = ByteTokenizer()
    euro = list("€".encode("utf-8"))  # 3 bytes
    assert tokenizer.decode(euro[:2]) == "\ufffd"
    assert tokenizer.decode(euro) == "€"
    # Special tokens between bytes split the byte run; a multi-byte char split by one is broken.
    assert tokenizer.decode([*b"ab", ByteTokenizer.EOS, *b"c"]) == "abc"


def test_byte_tokenizer_specials_shown_when_not_skipped():
    tokenizer = ByteTokenizer()
    ids = [ByteTokenizer.BOS, *b"hi", ByteTokenizer.IM_END, ByteTokenizer.EOS]
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<bos>hi<|im_end|><eos>"
    assert tokenizer.decode(ids) == "hi"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([260])


def test_byte_tokenizer_chat_template():
    tokenizer = ByteTokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(messages) == "system: Be brief.\nuser: Hi\nassistant: "
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=False) == "system: Be brief.\nuser: Hi\n"


def test_chat_template_renders_like_hugging_face():
    template = ChatTemplate(CHATML, {"bos_token": "<s>", "eos_token": "</s>"})
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"},
                {"role": "user", "content": "Bye"}]
    expected = ("<s><|im_start|>system\nDefault system.<|im_end|>\n"
                "<|im_start|>user\nHello<|im_end|>\n"
                "<|im_start|>assistant\nHi!<|im_end|>\n"
                "<|im_start|>user\nBye<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert template.render(messages) == expected
    assert template.render(messages, add_generation_prompt=False) == expected.removesuffix("<|im_start|>assistant\n")
    with_system = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert template.render(with_system, add_generation_prompt=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n")


def test_chat_template_tools_use_json_without_html_escaping():
    template = ChatTemplate(CHATML)
    tools = [{"name": "lookup", "description": "a <b> & 'c' é"}]
    rendered = template.render([{"role": "system", "content": "S"}], add_generation_prompt=False, tools=tools)
    assert f"<tools>{json.dumps(tools, ensure_ascii=False)}</tools>\n" in rendered


def test_chat_template_trim_and_lstrip_blocks():
    source = "{% for m in messages %}\n    {{ m['content'] }}\n{% endfor %}"
    # trim_blocks eats the newline after a block tag, lstrip_blocks the indentation before one.
    assert ChatTemplate(source).render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == (
        "    a\n    b\n")


def test_chat_template_generation_tag_and_strftime():
    source = ("{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
              "{{ strftime_now('%Y') | length }}")
    assert ChatTemplate(source).render([{"role": "assistant", "content": "x"}]) == "x4"


def test_chat_template_raise_exception_becomes_chat_template_error():
    template = ChatTemplate(CHATML)
    with pytest.raises(ChatTemplateError, match="unknown role tool"):
        template.render([{"role": "tool", "content": "x"}])


def test_content_parts_are_flattened():
    template = ChatTemplate(CHATML)
    parts = [{"role": "system", "content": "S"},
             {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]}]
    plain = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hello, world"}]
    assert template.render(parts) == template.render(plain)


def test_non_text_content_part_is_rejected():
    template = ChatTemplate(CHATML)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(ChatTemplateError, match="image_url"):
        template.render(messages)


def test_bad_template_source_is_a_chat_template_error():
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")


def test_sandbox_blocks_attribute_escape():
    template = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        template.render([])


def _tiny_hf_tokenizer(chat_template: str | None) -> HFTokenizer:
    from tokenizers import AddedToken, Tokenizer as RustTokenizer, decoders, models, pre_tokenizers

    vocab = {chr(c): c - 32 for c in range(32, 127)}
    vocab["<|im_end|>"] = len(vocab)
    tokenizer = RustTokenizer(models.BPE(vocab, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken("<|im_end|>", special=True, normalized=False)])
    return HFTokenizer(tokenizer, bos_token_id=None, eos_token_ids=[vocab["<|im_end|>"]],
                       chat_template=chat_template)


def test_missing_chat_template_is_a_clear_error():
    tokenizer = _tiny_hf_tokenizer(chat_template=None)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert issubclass(ChatTemplateError, ValueError)


def test_hf_tokenizer_special_token_in_text_is_one_id():
    tokenizer = _tiny_hf_tokenizer(chat_template=CHATML)
    end_id = tokenizer.token_to_id("<|im_end|>")
    ids = tokenizer.encode("ab<|im_end|>")
    assert ids[-1] == end_id and len(ids) == 3
    assert tokenizer.eos_token_ids == frozenset({end_id})
    assert tokenizer.decode(ids) == "ab"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "ab<|im_end|>"
    # The template sees eos_token as the tokenizer's own string.
    tokenizer = _tiny_hf_tokenizer(chat_template="{{ eos_token }}")
    assert tokenizer.apply_chat_template([]) == "<|im_end|>"


def test_byte_tokenizer_boundaries_count_bytes_before_each_position():
    from kvserve.model.tokenizer import ByteTokenizer

    ids, counts = ByteTokenizer().encode_with_boundaries("héllo", [0, 2, 5], add_special_tokens=True)
    assert ids == ByteTokenizer().encode("héllo") and counts == [1, 4, 7]
