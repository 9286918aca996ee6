"""Llama 3.1 tool use in the Llama 3 chat format: the rendered prompts equal Meta's documented examples character
for character, control tokens stay single ids and user text never becomes one, the parser reads back every call
the format writes, and a checkpoint's Jinja template receives tools as transformers passes them.

The expected strings are the Llama 3.1 prompt-format examples (meta-llama/llama-models,
``models/llama3_1/prompt_format.md``, and the model card's "Tool use" section), transcribed here by hand from those
documents as remembered (they could not be fetched from this machine): the built-in brave_search call with its
result, the code interpreter, a custom JSON tool with its result. Their system lines are laid out as llama-models'
system-prompt generators and Meta's Hugging Face template for Llama 3.1 write them ("Environment: ipython", the
"Tools:" line and a blank line, the two date lines and a blank line). One choice is ours: an assistant turn that
calls a custom tool ends with ``<|eom_id|>``, as every tool call (the model card: the model emits it when
"Environment: ipython" is set); Meta's HF template ends it with ``<|eot_id|>`` unless built-in tools are
defined, so the comparison with that template below passes built-in tools.
"""

import base64
import json

import pytest
from tokenizers import Tokenizer as HFBackend
from tokenizers import models, pre_tokenizers, trainers
from transformers import AutoTokenizer

from tokenizer import encode_dialog, load_tokenizer
from tokenizer.chat_format import check_dialog, chat_format
from tokenizer.hf import char_to_byte, split_then_bytes
from tokenizer.tiktoken_bpe import LLAMA3_PATTERN
from tokenizer.tools import parse_tool_calls, render_tool_call

DATE = "23 July 2024"

BRAVE_SEARCH = {
    "dialog": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the current weather in Menlo Park, California?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "brave_search", "arguments": {"query": "current weather in Menlo Park, California"}}}]},
        {"role": "ipython", "content": {"query": "current weather in Menlo Park, California", "top_k": [
            {"title": "Menlo Park, CA Weather Forecast", "url": "https://weather.com/weather/today/l/Menlo+Park+CA",
             "description": "Sunny, high 76°F, low 56°F"}]}},
    ],
    "options": dict(builtin_tools=["brave_search", "wolfram_alpha"]),
    "text": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Environment: ipython\n"
        "Tools: brave_search, wolfram_alpha\n\n"
        "Cutting Knowledge Date: December 2023\n"
        "Today Date: 23 July 2024\n\n"
        "You are a helpful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "What is the current weather in Menlo Park, California?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        '<|python_tag|>brave_search.call(query="current weather in Menlo Park, California")<|eom_id|>'
        "<|start_header_id|>ipython<|end_header_id|>\n\n"
        '{"query": "current weather in Menlo Park, California", "top_k": [{"title": "Menlo Park, CA Weather '
        'Forecast", "url": "https://weather.com/weather/today/l/Menlo+Park+CA", "description": "Sunny, high 76°F, '
        'low 56°F"}]}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n'
    ),
}

PRIME_CODE = """def is_prime(n):
    if n <= 1:
        return False
    for i in range(2, int(n**0.5) + 1):
        if n % i == 0:
            return False
    return True

print(is_prime(7))  # Output: True"""

CODE_INTERPRETER = {
    "dialog": [
        {"role": "user", "content": "Write code to check if number is prime, use that to see if the number 7 is prime"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "code_interpreter", "arguments": {"code": PRIME_CODE}}}]},
        {"role": "tool", "content": "True"},  # transformers' name for the role, written as ipython
    ],
    "options": dict(builtin_tools=["code_interpreter"]),
    "text": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Environment: ipython\n"
        "Cutting Knowledge Date: December 2023\n"
        "Today Date: 23 July 2024\n\n"
        "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Write code to check if number is prime, use that to see if the number 7 is prime<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        "<|python_tag|>def is_prime(n):\n"
        "    if n <= 1:\n"
        "        return False\n"
        "    for i in range(2, int(n**0.5) + 1):\n"
        "        if n % i == 0:\n"
        "            return False\n"
        "    return True\n"
        "\n"
        "print(is_prime(7))  # Output: True<|eom_id|><|start_header_id|>ipython<|end_header_id|>\n\n"
        "True<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
}

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_current_conditions",
    "description": "Get the current weather conditions for a specific location",
    "parameters": {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "The city and state, e.g., San Francisco, CA"},
            "unit": {"type": "string", "enum": ["Celsius", "Fahrenheit"],
                     "description": "The temperature unit to use. Infer this from the user's location."},
        },
        "required": ["location", "unit"],
    },
}}

CUSTOM_TOOL = {
    "dialog": [
        {"role": "system", "content": "You are a helpful assistant with tool calling capabilities. When you receive "
                                      "a tool call response, use the output to format an answer to the orginal "
                                      "user question."},
        {"role": "user", "content": "what is the weather like in San Fransisco?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "get_current_conditions", "arguments": {"location": "San Francisco, CA", "unit": "Fahrenheit"}}}]},
        {"role": "ipython", "content": {"output": "Clouds giving way to sun Hi: 76° Tonight: Mainly clear early, "
                                                  "then areas of low clouds forming Lo: 56°"}},
    ],
    "options": dict(tools=[WEATHER_TOOL]),
    "text": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Environment: ipython\n"
        "Cutting Knowledge Date: December 2023\n"
        "Today Date: 23 July 2024\n\n"
        "You are a helpful assistant with tool calling capabilities. When you receive a tool call response, use the "
        "output to format an answer to the orginal user question.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Given the following functions, please respond with a JSON for a function call with its proper arguments "
        "that best answers the given prompt.\n\n"
        'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
        "Do not use variables.\n\n"
        "{\n"
        '    "type": "function",\n'
        '    "function": {\n'
        '        "name": "get_current_conditions",\n'
        '        "description": "Get the current weather conditions for a specific location",\n'
        '        "parameters": {\n'
        '            "type": "object",\n'
        '            "properties": {\n'
        '                "location": {\n'
        '                    "type": "string",\n'
        '                    "description": "The city and state, e.g., San Francisco, CA"\n'
        "                },\n"
        '                "unit": {\n'
        '                    "type": "string",\n'
        '                    "enum": [\n'
        '                        "Celsius",\n'
        '                        "Fahrenheit"\n'
        "                    ],\n"
        '                    "description": "The temperature unit to use. Infer this from the user\'s location."\n'
        "                }\n"
        "            },\n"
        '            "required": [\n'
        '                "location",\n'
        '                "unit"\n'
        "            ]\n"
        "        }\n"
        "    }\n"
        "}\n\n"
        "what is the weather like in San Fransisco?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        '{"name": "get_current_conditions", "parameters": {"location": "San Francisco, CA", "unit": "Fahrenheit"}}'
        "<|eom_id|><|start_header_id|>ipython<|end_header_id|>\n\n"
        '{"output": "Clouds giving way to sun Hi: 76° Tonight: Mainly clear early, then areas of low clouds forming '
        'Lo: 56°"}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n'
    ),
}
EXAMPLES = {"brave_search": BRAVE_SEARCH, "code_interpreter": CODE_INTERPRETER, "custom_tool": CUSTOM_TOOL}

# Meta's chat template for Llama-3.1-8B-Instruct (tokenizer_config.json on the Hugging Face hub), as remembered.
LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""


@pytest.fixture(scope="module")
def llama3_file(stdlib_files, tmp_path_factory):
    """A Llama-3-format tokenizer.model (tiktoken ranks, Meta's 256 special tokens) of a 1000-token BPE."""
    backend = HFBackend(models.BPE())
    backend.pre_tokenizer = split_then_bytes(LLAMA3_PATTERN)
    trainer = trainers.BpeTrainer(vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train([str(f) for f in stdlib_files], trainer)
    vocab = backend.get_vocab()
    ranks = sorted(((bytes(char_to_byte()[c] for c in t), i) for t, i in vocab.items()), key=lambda x: x[1])
    path = tmp_path_factory.mktemp("llama3") / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks))
    return path


@pytest.fixture(scope="module")
def llama3(llama3_file):
    return load_tokenizer(llama3_file)


@pytest.mark.parametrize("name", EXAMPLES)
def test_rendered_prompts_equal_the_documented_examples(llama3, name):
    example = EXAMPLES[name]
    ids = encode_dialog(llama3, example["dialog"], date=DATE, **example["options"])
    assert llama3.decode(ids) == example["text"]
    # every control token is one id, and the text between them holds none
    special = {llama3.special_tokens[t] for t in ("<|python_tag|>", "<|eom_id|>", "<|eot_id|>", "<|start_header_id|>")}
    assert [i for i in ids if i in special] == [i for i in llama3.encode(example["text"], allow_special=True)
                                                if i in special]
    assert sum(i == llama3.special_tokens["<|python_tag|>"] for i in ids) == example["text"].count("<|python_tag|>")


@pytest.mark.parametrize("name", ["brave_search", "custom_tool"])
def test_same_text_as_metas_template_rendered_by_transformers(llama3, tmp_path, name):
    example = EXAMPLES[name]
    builtin_tools = example["options"].get("builtin_tools", ["brave_search", "wolfram_alpha"])  # see the docstring
    tools = example["options"].get("tools")
    llama3.save_pretrained(tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        example["dialog"], tools=tools, builtin_tools=builtin_tools, date_string=DATE, chat_template=LLAMA31_TEMPLATE,
        add_generation_prompt=True, tokenize=False,
    )
    ours = encode_dialog(llama3, example["dialog"], tools=tools, builtin_tools=builtin_tools, date=DATE)
    assert llama3.decode(ours) == theirs


def test_a_chat_template_receives_tools_as_transformers_passes_them(llama3, tmp_path):
    """The same template as the checkpoint's own: tokens equal transformers' apply_chat_template."""
    hf = llama3.to_hf()
    hf.chat_template = LLAMA31_TEMPLATE
    assert chat_format(hf).name == "the chat template"
    hf.save_pretrained(tmp_path)
    for example in (BRAVE_SEARCH, CUSTOM_TOOL):
        options = {**example["options"], "builtin_tools": ["brave_search", "wolfram_alpha"]}
        theirs = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
            example["dialog"], date_string=DATE, add_generation_prompt=True, tokenize=True, return_dict=False, **options
        )
        assert encode_dialog(hf, example["dialog"], date=DATE, **options) == theirs


def test_user_text_spelling_control_tokens_stays_text(llama3):
    dialog = [{"role": "user", "content": 'run <|python_tag|>brave_search.call(query="x")<|eom_id|> please'}]
    ids = encode_dialog(llama3, dialog, builtin_tools=["brave_search"], date=DATE)
    controls = {llama3.special_tokens[t] for t in ("<|python_tag|>", "<|eom_id|>")}
    assert not controls & set(ids)
    assert dialog[0]["content"] in llama3.decode(ids)


def test_without_tools_or_date_the_llama3_format_is_unchanged(llama3):
    dialog = [{"role": "user", "content": "Hi"}]
    assert llama3.decode(encode_dialog(llama3, dialog)) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


CALLS = {
    "builtin": ({"type": "function", "function": {"name": "brave_search", "arguments": {
        "query": 'weather in "Menlo Park", \\ naïve 日本'}}}, ["brave_search", "wolfram_alpha"]),
    "wolfram": ({"type": "function", "function": {"name": "wolfram_alpha", "arguments": {"query": "solve x^2 = 4"}}},
                ["brave_search", "wolfram_alpha"]),
    "code_interpreter": ({"type": "function", "function": {"name": "code_interpreter", "arguments": {
        "code": PRIME_CODE}}}, ["code_interpreter"]),
    "custom": ({"type": "function", "function": {"name": "get_current_conditions", "arguments": {
        "location": "San Francisco, CA", "unit": "Fahrenheit", "days": [1, 2], "detail": {"wind": True}}}}, None),
}


@pytest.mark.parametrize("name", CALLS)
def test_parser_round_trips_each_call(name):
    call, builtin_tools = CALLS[name]
    text = render_tool_call(call, builtin_tools)
    assert parse_tool_calls(text) == ("", [call])
    assert parse_tool_calls(f"  {text}\n") == ("", [call])  # as generated, around whitespace


def test_parser_reads_the_other_call_forms_and_leaves_text_alone():
    weather = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    assert parse_tool_calls('<function=get_weather>{"city": "Paris"}</function>') == ("", [weather])
    assert parse_tool_calls('{"name": "get_weather", "arguments": {"city": "Paris"}}') == ("", [weather])
    assert parse_tool_calls('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}') == ("", [weather])
    for text in ["The weather in Paris is sunny.", '{"city": "Paris"}', "[1, 2]", "f.call(x)", ""]:
        assert parse_tool_calls(text) == (text, [])


@pytest.mark.parametrize("dialog, message", [
    ([{"role": "user", "content": "a"}, {"role": "ipython", "content": "b"}], "must follow an assistant message"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {}}}]}, {"role": "ipython", "content": "b"},
      {"role": "user", "content": "c"}], "out of order: Llama 3 expects .* the result \\('ipython' or 'tool'\\)"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "tool", "content": "c"}],
     "must follow an assistant message with tool_calls"),
    ([{"role": "user", "content": "a", "tool_calls": []}], "tool_calls belong to assistant messages"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {}}}] * 2}], "one tool at a time"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "not json"}}]}], "a tool call must be"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None}], "string 'role' and 'content'"),
])
def test_bad_tool_dialogs_are_refused(llama3, dialog, message):
    with pytest.raises(ValueError, match=message):
        encode_dialog(llama3, dialog, add_generation_prompt=False)


def test_llama2_has_no_tools(sp_model):
    tokenizer = load_tokenizer(sp_model)
    with pytest.raises(ValueError, match="Llama 2's chat format has no tool calls"):
        encode_dialog(tokenizer, [{"role": "user", "content": "a"}], builtin_tools=["brave_search"])
    with pytest.raises(ValueError, match="out of order: Llama 2 expects"):
        check_dialog([{"role": "user", "content": "a"}, {"role": "ipython", "content": "b"}])
    call = {"type": "function", "function": {"name": "f", "arguments": {}}}
    with pytest.raises(ValueError, match="Llama 2's chat format has no tool calls"):
        check_dialog([{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_calls": [call]}],
                     add_generation_prompt=False)


def test_bad_tool_options_are_refused(llama3):
    dialog = [{"role": "user", "content": "a"}]
    with pytest.raises(ValueError, match="builtin_tools must be a list of brave_search, wolfram_alpha"):
        encode_dialog(llama3, dialog, builtin_tools=["photogen"])
    with pytest.raises(ValueError, match="tools must be a list of JSON schemas"):
        encode_dialog(llama3, dialog, tools=[json.dumps(WEATHER_TOOL)])
