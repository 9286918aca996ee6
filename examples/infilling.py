"""Fill in the middle of code, as Code Llama's example_infilling.py does: each prompt marks the gap with <FILL>,
the text before it is the prefix and the text after it the suffix.

    torchrun --nproc_per_node 1 examples/infilling.py --ckpt_dir CODE_LLAMA_CHECKPOINT
    python examples/infilling.py --ckpt_dir runs/smollm2-code-fim/final   # SmolLM2 taught FIM: smollm2_code_fim.toml

The checkpoint's vocabulary must hold FIM tokens (Code Llama's or the StarCoder family's); one without them is
refused with a message that says so.
"""

import fire

from llama import Llama
from llama.generation import SamplingParams


def main(
    ckpt_dir: str,
    tokenizer_path: str | None = None,
    temperature: float = 0.0,
    top_p: float = 0.9,
    max_seq_len: int = 256,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    suffix_first: bool = False,
    compile: bool = False,
    quantize: str | None = None,
):
    SamplingParams(temperature, top_p, max_tokens=max_gen_len).check()  # before the model loads
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        compile=compile,
        quantize=quantize,
    )
    prompts = [
        '''def remove_non_ascii(s: str) -> str:
    """ <FILL>
    return result
''',
        """import os


def list_python_files(root):
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
<FILL>
    return sorted(found)
""",
        """class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
<FILL>
""",
    ]
    prefixes = [p.split("<FILL>")[0] for p in prompts]
    suffixes = [p.split("<FILL>")[1] for p in prompts]
    results = generator.text_infilling(
        prefixes=prefixes,
        suffixes=suffixes,
        temperature=temperature,
        top_p=top_p,
        max_gen_len=max_gen_len,
        suffix_first=suffix_first,
    )
    for prompt, result in zip(prompts, results):
        print("\n================= Prompt text =================\n")
        print(prompt)
        print("\n================= Filled text =================\n")
        print(result["full_text"])


if __name__ == "__main__":
    fire.Fire(main)
