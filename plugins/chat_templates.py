"""Built-in chat templates: `chatml`, `llama3`, `alpaca`, `mistral`, `qwen`, `gemma`, `phi3`.

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
    summary="ChatML: <|im_start|>role ... <|im_end|> (many open fine-tunes; qwen adds tools)",
)

# Llama 3 headers; content is trimmed as Meta's own formatting does. Llama 3.1+'s own templates add a
# dated system header and their tool formats; this one has none, and refuses a tool call rather than
# render its message as an empty answer (the trim would turn the missing content into "").
LLAMA3 = ChatTemplate(
    name="llama3",
    source=r"""{{- '<|begin_of_text|>' }}
{%- for message in messages %}
{%- if message['tool_calls'] %}
{{- raise_exception('llama3 has no format for tool calls (message ' ~ loop.index0 ~ '); use the tokenizer\'s own template (Llama 3.1 and later have one) or qwen') }}
{%- endif %}
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

# Qwen 2.5 / Qwen 3: ChatML plus function calling. Tool signatures go in the system turn inside
# <tools></tools>, one JSON object a line; an assistant's calls follow its text as
# <tool_call>{"name": ..., "arguments": ...}</tool_call>; tool results come back in a user turn, each
# inside <tool_response></tool_response>, consecutive results sharing one turn. The tags and the call's
# JSON shape are Qwen's; the sentences around the signatures are ours (the template travels with the
# model, so a model trained with it is prompted with it). Unlike Qwen 2.5's own template there is no
# default system prompt (as in Qwen 3's), and history is never rewritten (Qwen 3's drops earlier
# <think> blocks), which the loss masking needs.
QWEN = ChatTemplate(
    name="qwen",
    source=r"""{%- if messages and messages[0]['role'] == 'system' %}
{%- set system = messages[0]['content'] %}
{%- set turns = messages[1:] %}
{%- else %}
{%- set system = none %}
{%- set turns = messages %}
{%- endif %}
{%- if tools %}
{{- '<|im_start|>system\n' }}
{%- if system is not none %}
{{- system + '\n\n' }}
{%- endif %}
{{- '# Tools\n\nYou can call the functions whose JSON signatures are listed in <tools></tools>, one a line:\n<tools>' }}
{%- for tool in tools %}
{{- '\n' + (tool | tojson) }}
{%- endfor %}
{{- '\n</tools>\n\nTo call one, write its name and arguments as a JSON object in <tool_call></tool_call> tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- elif system is not none %}
{{- '<|im_start|>system\n' + system + '<|im_end|>\n' }}
{%- endif %}
{%- for message in turns %}
{%- set content = message['content'] if message['content'] is defined else '' %}
{%- if message['role'] == 'tool' %}
{%- if loop.first or loop.previtem['role'] != 'tool' %}
{{- '<|im_start|>user' }}
{%- endif %}
{{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
{%- if loop.last or loop.nextitem['role'] != 'tool' %}
{{- '<|im_end|>\n' }}
{%- endif %}
{%- elif message['role'] == 'assistant' and message['tool_calls'] %}
{{- '<|im_start|>assistant\n' + content }}
{%- for call in message['tool_calls'] %}
{%- set fn = call['function'] if call['function'] is defined else call %}
{{- ('\n' if content or not loop.first else '') + '<tool_call>\n{"name": "' + fn['name'] + '", "arguments": ' }}
{{- fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson) }}
{{- '}\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\n' }}
{%- else %}
{{- '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- endif %}
""",
    eos="<|im_end|>",
    bos=None,
    pad="<|endoftext|>",
    # <tool_call>/<tool_response> are deliberately not special: decode(skip_special_tokens=True) must keep
    # them so a call can be parsed from the answer (Qwen's vocabularies hold them as plain added tokens).
    special_tokens=("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
    stop=("<|endoftext|>", "<|im_start|>"),
    summary="Qwen 2.5/3: ChatML with tools in the system turn, <tool_call> answers and tool results in a user turn",
)

# Gemma 2 / Gemma 3: <start_of_turn>user|model ... <end_of_turn>. Gemma has no system role: as in
# Gemma 3's own template, a system message is put in front of the first user message, followed by a
# blank line. Turns must alternate user/model; contents are trimmed.
GEMMA = ChatTemplate(
    name="gemma",
    source=r"""{{- '<bos>' }}
{%- if messages and messages[0]['role'] == 'system' %}
{%- set prefix = messages[0]['content'] + '\n\n' %}
{%- set turns = messages[1:] %}
{%- set offset = 1 %}
{%- else %}
{%- set prefix = '' %}
{%- set turns = messages %}
{%- set offset = 0 %}
{%- endif %}
{%- for message in turns %}
{%- if message['tool_calls'] %}
{{- raise_exception('gemma has no format for tool calls (message ' ~ (loop.index0 + offset) ~ '); use the qwen template or the tokenizer\'s own') }}
{%- endif %}
{%- set expected = 'user' if loop.index0 % 2 == 0 else 'assistant' %}
{%- if message['role'] != expected %}
{{- raise_exception('gemma needs user and assistant messages to alternate (a system message may only come first, and goes in front of the first user message); message ' ~ (loop.index0 + offset) ~ ' is ' ~ message['role'] ~ ', expected ' ~ expected) }}
{%- endif %}
{%- if message['role'] == 'user' %}
{{- '<start_of_turn>user\n' + (prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}
{%- else %}
{{- '<start_of_turn>model\n' + message['content'] | trim + '<end_of_turn>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<start_of_turn>model\n' }}
{%- endif %}
""",
    eos="<end_of_turn>",  # ends a turn; <eos> ends a document
    bos="<bos>",
    pad="<pad>",  # Gemma vocabularies reserve it (id 0)
    special_tokens=("<start_of_turn>", "<end_of_turn>"),
    stop=("<eos>", "<start_of_turn>"),
    summary="Gemma 2/3: <start_of_turn>user|model ... <end_of_turn> (a system message goes in front of the first user turn)",
)

# Phi-3 / Phi-3.5: <|role|>\ncontent<|end|>\n. An empty system message is left out, as Phi-3.5's own
# template does. Its own template also writes the EOS after the last message when no generation prompt
# is asked for; that would make a conversation's rendering differ from its prefixes (and be trained as
# an extra token after every final answer), so it is not written here: <|end|> already ends the turn.
PHI3 = ChatTemplate(
    name="phi3",
    source=r"""{%- for message in messages %}
{%- if message['tool_calls'] %}
{{- raise_exception('phi3 has no format for tool calls (message ' ~ loop.index0 ~ '); use the qwen template or the tokenizer\'s own') }}
{%- elif message['role'] == 'system' %}
{%- if message['content'] %}
{{- '<|system|>\n' + message['content'] + '<|end|>\n' }}
{%- endif %}
{%- elif message['role'] == 'user' %}
{{- '<|user|>\n' + message['content'] + '<|end|>\n' }}
{%- elif message['role'] == 'assistant' %}
{{- '<|assistant|>\n' + message['content'] + '<|end|>\n' }}
{%- else %}
{{- raise_exception('phi3 supports system, user and assistant messages, not ' + message['role']) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|assistant|>\n' }}
{%- endif %}
""",
    eos="<|end|>",
    bos=None,  # Phi-3.5's template writes none, and its tokenizer adds none
    pad="<|endoftext|>",  # the pad Phi-3 tokenizers already use
    special_tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>"),
    stop=("<|endoftext|>", "<|user|>"),
    summary="Phi-3: <|system|>/<|user|>/<|assistant|> ... <|end|>",
)

BUILTIN_TEMPLATES = (CHATML, LLAMA3, ALPACA, MISTRAL, QWEN, GEMMA, PHI3)
