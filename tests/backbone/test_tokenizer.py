"""Tokenizer and chat templates against transformers' AutoTokenizer on the same folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from backbone.chat_template import ChatTemplateError
from backbone.errors import ModelLoadError
from backbone.tokenizer import Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<|user|>", "<|assistant|>", "<|system|>"]  # fmt: skip
CORPUS = ["the quick brown fox jumps over the lazy dog", "what is the capital of france? paris.",
          "hello world, you are a helpful assistant", "emoji 😀🎉 and 中文 text"] * 10  # fmt: skip

# SmolLM2-135M-Instruct's template (the default model), verbatim.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-3 style: bos_token variable, whitespace control, trim filter, slicing, strftime_now, tools via tojson.
LLAMA3 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + strftime_now("%d %b %Y") + "\\n\\n" }}
{%- if tools is not none %}{{- tools | tojson(indent=4) }}{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('Only user and assistant roles are supported after the system message') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
# Zephyr style: indented blocks that only render right with trim_blocks + lstrip_blocks; eos_token variable.
ZEPHYR = """{% for message in messages %}
    {% if message['role'] == 'user' %}
        {{ '<|user|>\\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'system' %}
        {{ '<|system|>\\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'assistant' %}
        {{ '<|assistant|>\\n'  + message['content'] + eos_token }}
    {% endif %}
    {% if loop.last and add_generation_prompt %}
        {{ '<|assistant|>' }}
    {% endif %}
{% endfor %}"""
# ChatML with a namespace counter and loop controls.
CHATML_NS = """{%- set ns = namespace(turns=0) -%}
{%- for message in messages -%}
{%- if message['role'] == 'skip' %}{% continue %}{% endif -%}
{%- set ns.turns = ns.turns + 1 -%}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}"""

TEMPLATES = {"smollm2": SMOLLM2, "llama3": LLAMA3, "zephyr": ZEPHYR, "chatml_namespace": CHATML_NS}
CONVERSATIONS = {
    "user_only": [{"role": "user", "content": "What is the capital of France?"}],
    "with_system": [
        {"role": "system", "content": "  You answer briefly.  "},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Name a <b>bold</b> \"quoted\" city & its country: 中文 😀"},
    ],
}


def train_tiny_tokenizer() -> BackendTokenizer:
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer)
    return backend


@pytest.fixture(scope="module")
def tiny_backend() -> BackendTokenizer:
    return train_tiny_tokenizer()


def save_tokenizer_folder(folder: Path, backend: BackendTokenizer, **tokenizer_config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, **tokenizer_config}))
    return folder


def reference_tokenizer(folder: Path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["gen_prompt", "no_gen_prompt"])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("template", TEMPLATES)
def test_chat_template_renders_as_transformers(tmp_path, tiny_backend, template, conversation, add_generation_prompt):
    folder = save_tokenizer_folder(tmp_path, tiny_backend, chat_template=TEMPLATES[template])
    messages = CONVERSATIONS[conversation]
    expected = reference_tokenizer(folder).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    ours = Tokenizer.from_folder(folder)
    assert ours.has_chat_template
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_from_chat_template_jinja_file(tmp_path, tiny_backend):
    folder = save_tokenizer_folder(tmp_path, tiny_backend)
    (folder / "chat_template.jinja").write_text(ZEPHYR)
    messages = CONVERSATIONS["with_system"]
    expected = reference_tokenizer(folder).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert Tokenizer.from_folder(folder).apply_chat_template(messages) == expected


def test_tools_render_as_unescaped_json(tmp_path, tiny_backend):
    folder = save_tokenizer_folder(tmp_path, tiny_backend, chat_template=LLAMA3)
    tools = [{"type": "function", "function": {"name": "find <city>", "parameters": {"a&b": "ü"}}}]
    messages = CONVERSATIONS["user_only"]
    expected = reference_tokenizer(folder).apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    rendered = Tokenizer.from_folder(folder).apply_chat_template(messages, tools=tools)
    assert rendered == expected and '"find <city>"' in rendered


def test_template_raise_exception_is_a_chat_template_error(tmp_path, tiny_backend):
    folder = save_tokenizer_folder(tmp_path, tiny_backend, chat_template=LLAMA3)
    with pytest.raises(ChatTemplateError, match="Only user and assistant roles"):
        Tokenizer.from_folder(folder).apply_chat_template([{"role": "tool", "content": "x"}])


def test_template_cannot_reach_python_internals(tmp_path, tiny_backend):
    folder = save_tokenizer_folder(tmp_path, tiny_backend, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError, match="unsafe"):  # the sandbox refuses dunder attributes
        Tokenizer.from_folder(folder).apply_chat_template(CONVERSATIONS["user_only"])


def test_no_chat_template_is_a_clear_error(tmp_path, tiny_backend):
    ours = Tokenizer.from_folder(save_tokenizer_folder(tmp_path, tiny_backend))
    assert not ours.has_chat_template
    with pytest.raises(ModelLoadError, match="no chat template"):
        ours.apply_chat_template(CONVERSATIONS["user_only"])


@pytest.mark.parametrize("template", [None, "<|begin_of_text|> $A", "<|begin_of_text|> $A <|endoftext|>"],
                         ids=["no_post_processor", "bos", "bos_eos"])  # fmt: skip
def test_encode_matches_transformers(tmp_path, tiny_backend, template):
    backend = BackendTokenizer.from_str(tiny_backend.to_str())
    if template is not None:  # BOS/EOS come from tokenizer.json's post-processor, as in Llama checkpoints
        specials = [(token, backend.token_to_id(token)) for token in ("<|begin_of_text|>", "<|endoftext|>")]
        backend.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
    folder = save_tokenizer_folder(tmp_path, backend)
    reference, ours = reference_tokenizer(folder), Tokenizer.from_folder(folder)
    if template is not None:
        assert ours.encode("the", add_special_tokens=True)[0] == backend.token_to_id("<|begin_of_text|>")
    for text in ["the quick brown fox", " leading space", "<|im_start|>user\nhi<|im_end|>\n", "emoji 😀 中文", ""]:
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False), text
        assert ours.encode(text, add_special_tokens=True) == reference.encode(text), text
        ids = reference.encode(text)
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids, skip_special_tokens=False)


def test_special_token_ids_and_eos_sources(tmp_path, tiny_backend):
    folder = save_tokenizer_folder(tmp_path, tiny_backend, pad_token={"content": "<|endoftext|>", "special": True})
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [tiny_backend.token_to_id("<|eot_id|>")]}))
    (folder / "config.json").write_text(json.dumps({"eos_token_id": tiny_backend.token_to_id("<|endoftext|>")}))
    ours = Tokenizer.from_folder(folder)
    ids = [tiny_backend.token_to_id(t) for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>")]
    assert ours.eos_token_ids == ids and ours.eos_token_id == ids[0]
    assert ours.pad_token_id == tiny_backend.token_to_id("<|endoftext|>")
    assert ours.bos_token == "<|begin_of_text|>" and ours.eos_token == "<|im_end|>"
    assert ours.vocab_size == tiny_backend.get_vocab_size(with_added_tokens=True)


def test_missing_tokenizer_json_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="needs a tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def test_corrupt_tokenizer_json_is_a_model_load_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(ModelLoadError, match="cannot be read"):
        Tokenizer.from_folder(tmp_path)
