"""Built-in chat templates: `chatml`, `llama3`, `alpaca`, `mistral`.

Each is a Jinja source in the Hugging Face chat-template dialect plus the tokens it relies on, so
the same source works in `tokenizer.apply_chat_template`, in llmforge's loss masking and after a
GGUF export. The markers are written literally (not through `bos_token`/`eos_token`) so that a
template renders the same whatever tokenizer it is later paired with.

Every template here keeps one property the loss masking depends on: rendering the first k messages
(with the generation prompt when the next message is the assistant's) gives a prefix of rendering
the whole conversation. Keep it when adding a template.

Imported at every start-up: nothing heavy here.
"""

from __future__ import annotations

from llmforge.chat import ChatTemplate

# <|im_start|>role\ncontent<|im_end|>\n: the format of Qwen and many open fine-tunes.
CHATML = ChatTemplate(
    name="chatml",
    source=r"""{%- for message in messages %}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- endif %}
""",
    eos="<|im_end|>",
    bos=None,  # the format has no BOS; tokens start with the first <|im_start|>
    # <|endoftext|> is what Qwen tokenizers pad with: reusing it adds nothing to their vocabulary,
    # and it differs from the EOS, which must never be masked as padding.
    pad="<|endoftext|>",
    special_tokens=("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
    stop=("<|endoftext|>", "<|im_start|>"),
    summary="ChatML: <|im_start|>role ... <|im_end|> (Qwen, many open fine-tunes)",
)

# Llama 3 headers; content is trimmed as Meta's own formatting does.
LLAMA3 = ChatTemplate(
    name="llama3",
    source=r"""{{- '<|begin_of_text|>' }}
{%- for message in messages %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
""",
    eos="<|eot_id|>",  # ends a turn; <|end_of_text|> ends a document in pretraining
    bos="<|begin_of_text|>",
    pad="<|finetune_right_pad_id|>",  # the pad Llama 3.1 tokenizers already reserve
    special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    stop=("<|end_of_text|>",),
    summary="Llama 3: <|start_header_id|>role<|end_header_id|> ... <|eot_id|>",
)

# Instruction/Response blocks with a preamble; the system message, if any, replaces the preamble.
ALPACA = ChatTemplate(
    name="alpaca",
    source=r"""{%- if messages and messages[0]['role'] == 'system' %}
{%- set preamble = messages[0]['content'] %}
{%- set turns = messages[1:] %}
{%- else %}
{%- set preamble = 'Below is an instruction that describes a task. Write a response that appropriately completes the request.' %}
{%- set turns = messages %}
{%- endif %}
{{- '<s>' + preamble + '\n\n' }}
{%- for message in turns %}
{%- if message['role'] == 'user' %}
{{- '### Instruction:\n' + message['content'] + '\n\n' }}
{%- elif message['role'] == 'assistant' %}
{{- '### Response:\n' + message['content'] + '</s>\n\n' }}
{%- else %}
{{- raise_exception('alpaca supports system, user and assistant messages, not ' + message['role']) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '### Response:\n' }}
{%- endif %}
""",
    eos="</s>",
    bos="<s>",
    pad="<pad>",
    special_tokens=(),  # the headers are plain text in this format
    stop=("### Instruction:",),
    summary="Alpaca: ### Instruction: / ### Response: blocks ending with </s>",
)

# [INST] user [/INST] answer</s>; a system message goes in front of the first user message, because
# putting it anywhere later would make earlier turns render differently as the conversation grows.
MISTRAL = ChatTemplate(
    name="mistral",
    source=r"""{{- '<s>' }}
{%- if messages and messages[0]['role'] == 'system' %}
{%- set system = messages[0]['content'] %}
{%- set turns = messages[1:] %}
{%- else %}
{%- set system = '' %}
{%- set turns = messages %}
{%- endif %}
{%- for message in turns %}
{%- set expected = 'user' if loop.index0 % 2 == 0 else 'assistant' %}
{%- if message['role'] != expected %}
{{- raise_exception('mistral needs user and assistant messages to alternate (after an optional system message); message ' ~ loop.index0 ~ ' is ' ~ message['role'] ~ ', expected ' ~ expected) }}
{%- endif %}
{%- if message['role'] == 'user' %}
{%- if loop.first and system %}
{{- '[INST] ' + system + '\n\n' + message['content'] + ' [/INST]' }}
{%- else %}
{{- '[INST] ' + message['content'] + ' [/INST]' }}
{%- endif %}
{%- else %}
{{- ' ' + message['content'] + '</s>' }}
{%- endif %}
{%- endfor %}
""",
    eos="</s>",
    bos="<s>",
    # Mistral vocabularies have no pad; <unk> is what they are usually padded with (byte fallback
    # means it never occurs in text) and it is never the EOS.
    pad="<unk>",
    special_tokens=("[INST]", "[/INST]"),
    stop=("[INST]",),
    summary="Mistral: <s>[INST] user [/INST] answer</s> (no generation header: the answer follows [/INST])",
)

BUILTIN_TEMPLATES = (CHATML, LLAMA3, ALPACA, MISTRAL)
