"""Ollama Modelfiles: the TEMPLATE, executed by Go's text/template as Ollama executes it, renders a
conversation exactly as the model's Jinja chat template does; stop words and sampling settings."""

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from tiny_models import CHAT_TEMPLATE

from qlora_lite.data.tokenize import DEFAULT_CHAT_TEMPLATE
from qlora_lite.gguf.ollama import ollama_template, render_jinja, sample_conversations, write_modelfile
from qlora_lite.gguf.writer import export_gguf

# The chat formats fine-tuned models use, written the way their tokenizer_config.json templates do.
CHATML_WITH_DEFAULT_SYSTEM = (  # Qwen 2.5
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA3 = (  # the system text goes into the first user turn
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + "
    "'\n\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}"
    "{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
GEMMA2 = (  # no system role at all
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else "
    "message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + "
    "'<|end|>\n' }}{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content']"
    " + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}")
LLAMA2 = (  # the system text inside the first [INST] block, after <<SYS>>: not a per-role format
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}{% set content = "
    "'<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}{% else %}{% set content = "
    "message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content + "
    "' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + content + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")
TRANSLATABLE = {"chatml": DEFAULT_CHAT_TEMPLATE, "chatml-default-system": CHATML_WITH_DEFAULT_SYSTEM,
                "llama3": LLAMA3, "gemma3": GEMMA3, "gemma2": GEMMA2, "phi3": PHI3, "mistral": MISTRAL,
                "tiny": CHAT_TEMPLATE}
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>"}


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """``render(template, messages) -> str`` through Go's text/template, with Ollama's chat data."""
    if shutil.which("go") is None:
        if os.environ.get("CI"):
            pytest.fail("Go is not installed; .ci/run installs golang-go for the Ollama template tests")
        pytest.skip("Go is not installed (apt-get install golang-go) to execute Ollama templates")
    binary = tmp_path_factory.mktemp("go") / "ollama_render"
    env = {**os.environ, "GOCACHE": str(binary.parent / "cache"), "GOPATH": str(binary.parent / "path")}
    subprocess.run(["go", "build", "-o", str(binary), str(Path(__file__).with_name("ollama_render.go"))],
                   check=True, env=env, capture_output=True)

    def render(template: str, messages: list[dict]) -> str:
        done = subprocess.run([str(binary)], input=json.dumps({"template": template, "messages": messages}),
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    return render


def modelfile_fields(path: Path) -> tuple[str | None, list[str], dict[str, str]]:
    """TEMPLATE, stop words and other parameters of a Modelfile, read as Ollama's parser reads them."""
    text = path.read_text()
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0] if 'TEMPLATE """' in text else None
    stops, parameters = [], {}
    for line in text.splitlines():
        if line.startswith("PARAMETER stop "):
            stops.append(json.loads(line[len("PARAMETER stop "):]))
        elif line.startswith("PARAMETER "):
            name, value = line[len("PARAMETER "):].split(" ", 1)
            parameters[name] = value
    return template, stops, parameters


@pytest.mark.parametrize("name", sorted(TRANSLATABLE))
def test_go_template_renders_every_conversation_like_the_chat_template(name, go_render):
    template = TRANSLATABLE[name]
    chat = ollama_template(template, SPECIALS)
    assert chat is not None
    go = chat.go_template()
    conversations = sample_conversations(chat.system_supported) + [
        [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"},
         {"role": "user", "content": "Three"}, {"role": "assistant", "content": "Four {{ not an action }}"},
         {"role": "user", "content": "Five"}]]
    for messages in conversations:
        assert go_render(go, messages) == render_jinja(template, messages, True, SPECIALS), messages


def test_system_in_the_first_user_turn_and_default_system_prompts(go_render):
    system = [{"role": "system", "content": "Be brief."}]
    user = [{"role": "user", "content": "Hi"}]
    gemma = ollama_template(GEMMA3, SPECIALS)
    assert gemma.system_in_user
    assert go_render(gemma.go_template(), system + user) == (
        "<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n")
    qwen = ollama_template(CHATML_WITH_DEFAULT_SYSTEM, SPECIALS).go_template()
    assert "You are a helpful assistant." in go_render(qwen, user)
    assert "You are a helpful assistant." not in go_render(qwen, system + user)


def test_untranslatable_template_leaves_the_template_to_ollama(tmp_path, caplog):
    assert ollama_template(LLAMA2, SPECIALS) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA2, "eos_token": "</s>"}))
    with caplog.at_level(logging.WARNING):
        path = write_modelfile(tmp_path / "m.gguf", tmp_path)
    template, stops, _ = modelfile_fields(path)
    assert template is None and stops == ["</s>"]
    assert "no TEMPLATE" in caplog.text


@pytest.mark.parametrize("template", ["tiny", "llama3"])
def test_exported_modelfile_answers_in_ollama_as_in_transformers(template, tiny_model_factory, tmp_path, go_render):
    """The Modelfile beside an exported GGUF: its TEMPLATE renders a multi-turn chat exactly as the
    tokenizer's apply_chat_template does (less a BOS text that Ollama adds itself when the file says
    to), its stops end a reply, and the model's sampling settings are its parameters."""
    import gguf
    from transformers import AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_model_factory("qwen2"), model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = TRANSLATABLE[template]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").write_text(TRANSLATABLE[template])  # where transformers 5 looks first
    (model / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}))
    export_gguf(model, tmp_path / "out" / "m.gguf", out_type="q8_0", modelfile=True, progress=False)
    go_template, stops, parameters = modelfile_fields(tmp_path / "out" / "Modelfile")
    tokenizer = AutoTokenizer.from_pretrained(model)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    adds_bos = gguf.GGUFReader(tmp_path / "out" / "m.gguf").get_field("tokenizer.ggml.add_bos_token").contents()
    assert adds_bos == (tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id)
    ollama_adds = tokenizer.bos_token if adds_bos else ""
    assert ollama_adds + go_render(go_template, messages) == expected
    assert tokenizer.eos_token in stops
    assert ("<|user|>" if template == "tiny" else "<|eot_id|>") in stops
    assert parameters == {"temperature": "0.7", "top_p": "0.8", "top_k": "20", "repeat_penalty": "1.05"}
