"""fusion-jax's own Jinja chat templates for the names mergekit's ``chat_template:`` accepts.

Used when mergekit is not installed (with mergekit installed its own files are used, so the saved
tokenizer is byte-identical to mergekit's). Written for transformers' renderer (``trim_blocks``,
``lstrip_blocks``) to produce exactly the strings mergekit's templates render, whitespace included
(exaone's indentation is part of its rendered prompt); tests/test_merging_tokenizer.py renders both.
"""
from __future__ import annotations

TEMPLATES = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "llama3": (
        "{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + (m['content'] | trim) + '<|eot_id|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}"),
    "alpaca": (
        "{% set system = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{{ ((system | last).content | trim) if system else '' }}{{ '\\n\\n' }}"
        "{% set heads = {'user': '### Instruction:', 'assistant': '### Response:', 'user_context': '### Input:'} %}"
        "{% for m in messages %}{% if m['role'] in heads %}{{ heads[m['role']] + '\\n' + (m['content'] | trim) }}"
        "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '### Response:\\n' }}{% endif %}"),
    "exaone": (
        "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
        "{{ '        [|system|][|endofturn|]\\n\\n' }}{% endif %}"
        "{{ '    [|' + m['role'] + '|]' + m['content'] + '\\n        ' }}"
        "{{ '\\n\\n' if m['role'] == 'user' else '[|endofturn|]\\n\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '    [|assistant|]\\n' }}{% endif %}"),
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
        "{{ bos_token }}{% for m in loop_messages %}"
        "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('After the optional system message, roles must alternate user/assistant') }}{% endif %}"
        "{% if m['role'] == 'user' %}{{ ' [INST] ' + (system_message + '\\n\\n' if loop.first and system_message "
        "is defined else '') + m['content'] + ' [/INST]' }}"
        "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}"
        "{% else %}{{ raise_exception('Only user and assistant roles follow the optional system message') }}"
        "{% endif %}{% endfor %}"),
}
