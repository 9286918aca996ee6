"""One tool-call round trip: the model is offered a local Python function, calls it, reads its result and answers.

    torchrun --nproc_per_node 1 examples/tool_call.py --ckpt_dir LLAMA_3_1_CHECKPOINT
    python examples/tool_call.py            # the embedded SmolLM2-135M-Instruct

A Llama 3.1 checkpoint gets Llama 3.1's tool prompt (``tokenizer.tools``), with the function's JSON schema.
A checkpoint whose chat template takes ``tools`` gets them from it (as transformers passes them). SmolLM2's
template ignores tools, so for it the same instruction and schema go into the system message, with one worked
exchange (a call, its result, the answer) for the 135M model to follow, and the call and result travel as text.
The arguments the model writes are checked against the schema (a working path, not a quality claim).
"""

import json

import fire

from llama import Llama
from llama.generation import SamplingParams
from llama.checkpoint.embedded import default_checkpoint
from tokenizer import chat_format
from tokenizer.tools import custom_tools_preamble, render_tool_call


def get_current_temperature(location: str, unit: str = "celsius") -> dict:
    """The tool: a stand-in for a weather service."""
    celsius = {"paris": 22.0, "london": 17.5}.get(location.split(",")[0].strip().lower(), 20.0)
    return {"location": location, "temperature": celsius if unit == "celsius" else celsius * 9 / 5 + 32, "unit": unit}


TOOL = {"type": "function", "function": {
    "name": "get_current_temperature",
    "description": "Get the current temperature at a location.",
    "parameters": {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": 'The city and country, e.g. "Paris, France"'},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "The temperature unit"},
        },
        "required": ["location"],
    },
}}
FUNCTIONS = {"get_current_temperature": get_current_temperature}
WORKED_EXCHANGE = [  # for a model without a tool prompt of its own
    {"role": "user", "content": "What is the temperature in London, UK?"},
    {"role": "assistant", "content": '{"name": "get_current_temperature", "parameters": {"location": "London, UK"}}'},
    {"role": "user",
     "content": 'The tool returned: {"location": "London, UK", "temperature": 17.5, "unit": "celsius"}'},
    {"role": "assistant", "content": "It is 17.5 °C in London, UK."},
]


def main(
    ckpt_dir: str | None = None,
    tokenizer_path: str | None = None,
    temperature: float = 0.0,
    top_p: float = 0.9,
    max_seq_len: int = 1024,
    max_gen_len: int = 64,
    question: str = "What is the temperature in Paris, France right now?",
):
    SamplingParams(temperature, top_p, max_tokens=max_gen_len).check()  # before the model loads
    generator = Llama.build(ckpt_dir=ckpt_dir or default_checkpoint(), tokenizer_path=tokenizer_path,
                            max_seq_len=max_seq_len, max_batch_size=1)
    template = generator.tokenizer.chat_template
    tools_in_prompt = chat_format(generator.tokenizer).name == "Llama 3" or "tools" in (template or "")
    dialog = [{"role": "user", "content": question}]
    if not tools_in_prompt:  # the template would drop the tools: say it in the system message instead
        dialog = [{"role": "system", "content": custom_tools_preamble([TOOL]).strip()}, *WORKED_EXCHANGE, *dialog]
    options = dict(temperature=temperature, top_p=top_p, max_gen_len=max_gen_len, tools=[TOOL])

    answer = generator.chat_completion([dialog], **options)[0]["generation"]
    print(f"User: {question}\n\n> Assistant: {answer}\n")
    if not answer.get("tool_calls"):
        print("The model answered without calling the tool.")
        return
    call = answer["tool_calls"][0]["function"]
    if call["name"] not in FUNCTIONS:
        print(f"The model called {call['name']!r}, which is not offered.")
        return
    declared = TOOL["function"]["parameters"]["properties"]
    arguments = {key: value for key, value in call["arguments"].items() if key in declared}
    if arguments != call["arguments"]:
        print(f"(arguments the schema does not declare, dropped: {sorted(call['arguments'].keys() - declared)})")
    result = FUNCTIONS[call["name"]](**arguments)
    print(f"> Tool: {call['name']}({', '.join(f'{k}={v!r}' for k, v in arguments.items())}) returned {result}\n")
    if tools_in_prompt:
        dialog += [answer, {"role": "tool", "content": result}]
    else:  # the template writes contents only: the call as the model wrote it, the result as text
        dialog += [{"role": "assistant", "content": render_tool_call(answer["tool_calls"][0], None)},
                   {"role": "user", "content": f"The tool returned: {json.dumps(result)}"}]
    final = generator.chat_completion([dialog], **options)[0]["generation"]
    print(f"> Assistant: {final}")


if __name__ == "__main__":
    fire.Fire(main)
