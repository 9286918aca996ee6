"""Answer a few dialogs, as Meta's example_chat_completion.py does.

    torchrun --nproc_per_node 1 examples/chat_completion.py --ckpt_dir CHECKPOINT
    python examples/chat_completion.py            # the embedded SmolLM2-135M-Instruct
"""

import fire

from llama import Llama
from llama.generation import SamplingParams
from llama.checkpoint.embedded import default_checkpoint


def main(
    ckpt_dir: str | None = None,
    tokenizer_path: str | None = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_gen_len: int | None = 64,
    max_batch_size: int = 4,
    compile: bool = False,
    quantize: str | None = None,
):
    SamplingParams(temperature, top_p, max_tokens=max_gen_len).check()  # before the model loads
    generator = Llama.build(
        ckpt_dir=ckpt_dir or default_checkpoint(),
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        compile=compile,
        quantize=quantize,
    )
    dialogs = [
        [{"role": "user", "content": "what is the recipe of mayonnaise?"}],
        [
            {"role": "user", "content": "I am going to Paris, what should I see?"},
            {
                "role": "assistant",
                "content": "Paris, the capital of France, is known for the Eiffel Tower, the Louvre Museum "
                "and Notre-Dame Cathedral.",
            },
            {"role": "user", "content": "What is so great about #1?"},
        ],
        [
            {"role": "system", "content": "Always answer with Haiku"},
            {"role": "user", "content": "I am going to Paris, what should I see?"},
        ],
    ]
    results = generator.chat_completion(dialogs, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
    for dialog, result in zip(dialogs, results):
        for msg in dialog:
            print(f"{msg['role'].capitalize()}: {msg['content']}\n")
        print(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
        print("\n==================================\n")


if __name__ == "__main__":
    fire.Fire(main)
