"""Tool calls through ``Llama.chat_completion`` with a Llama-3-format tokenizer: a model wired to write a
code-interpreter call ends its turn at ``<|eom_id|>``, and the answer comes back as a structured call with the stop
reason that ended it; the call and its result then extend the dialog."""

import pytest

from llama.generation import Llama
from tokenizer import encode_dialog

DIALOG = [{"role": "user", "content": "Is 7 prime?"}]


@pytest.mark.parametrize("end, stop_reason", [("<|eom_id|>", "end_of_message"), ("<|eot_id|>", "end_of_turn")])
def test_a_tool_call_comes_back_structured_with_its_stop_reason(llama3_tokenizer, chain_model, end, stop_reason):
    llama3 = llama3_tokenizer
    prompt = encode_dialog(llama3, DIALOG, builtin_tools=["code_interpreter"])
    code = llama3.encode("print(7)")
    special = llama3.special_tokens
    model = chain_model(llama3, [prompt[-1], special["<|python_tag|>"], *code, special[end]])
    llama = Llama(model, llama3, max_seq_len=128, max_batch_size=2)
    answer = llama.chat_completion([DIALOG], temperature=0, max_gen_len=20, builtin_tools=["code_interpreter"])[0]
    call = {"type": "function", "function": {"name": "code_interpreter", "arguments": {"code": "print(7)"}}}
    expected = {"role": "assistant", "content": "", "tool_calls": [call], "stop_reason": stop_reason}
    assert answer["generation"] == expected
    # the call and the tool's result extend the dialog, which the assistant then answers
    dialog = DIALOG + [answer["generation"], {"role": "ipython", "content": "7"}]
    extended = encode_dialog(llama3, dialog, builtin_tools=["code_interpreter"])
    assert extended[: len(prompt)] == prompt
    assert llama3.decode(extended[len(prompt):]) == (
        "<|python_tag|>print(7)<|eom_id|><|start_header_id|>ipython<|end_header_id|>\n\n7<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_without_tools_the_text_is_returned_as_is(llama3_tokenizer, chain_model):
    llama3 = llama3_tokenizer
    prompt = encode_dialog(llama3, DIALOG)
    generated = [llama3.special_tokens["<|python_tag|>"], *llama3.encode("print(7)")]
    llama = Llama(chain_model(llama3, [prompt[-1], *generated]), llama3, max_seq_len=128, max_batch_size=1)
    answer = llama.chat_completion([DIALOG], temperature=0, max_gen_len=3)[0]["generation"]
    assert answer == {"role": "assistant", "content": llama3.decode(generated[:3]), "stop_reason": "out_of_tokens"}
    assert answer["content"].startswith("<|python_tag|>print")


def test_a_streamed_call_is_its_text(llama3_tokenizer, chain_model):
    llama3 = llama3_tokenizer
    prompt = encode_dialog(llama3, DIALOG, builtin_tools=["code_interpreter"])
    code = llama3.encode("print(7)")
    model = chain_model(llama3, [prompt[-1], llama3.special_tokens["<|python_tag|>"], *code,
                                 llama3.special_tokens["<|eom_id|>"]])
    llama = Llama(model, llama3, max_seq_len=128, max_batch_size=1)
    steps = llama.stream_chat_completion([DIALOG], temperature=0, max_gen_len=20, builtin_tools=["code_interpreter"])
    assert "".join(pieces[0] for pieces in steps) == "<|python_tag|>print(7)"
