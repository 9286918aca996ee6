"""Complete a few text prompts, as Meta's example_text_completion.py does.

    torchrun --nproc_per_node 1 examples/text_completion.py --ckpt_dir CHECKPOINT
    python examples/text_completion.py            # the embedded SmolLM2-135M-Instruct
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
    max_seq_len: int = 128,
    max_gen_len: int = 48,
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
    prompts = [
        # For these prompts, the expected answer is the natural continuation of the prompt
        "I believe the meaning of life is",
        "Simply put, the theory of relativity states that ",
        # Few shot prompt (providing a few examples before asking model to complete more);
        """Translate English to French:

        sea otter => loutre de mer
        peppermint => menthe poivrée
        plush girafe => girafe peluche
        cheese =>""",
    ]
    results = generator.text_completion(prompts, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
    for prompt, result in zip(prompts, results):
        print(prompt)
        print(f"> {result['generation']}")
        print("\n==================================\n")


if __name__ == "__main__":
    fire.Fire(main)
