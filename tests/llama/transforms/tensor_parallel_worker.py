"""Run by tests/llama/test_parallel.py, under torchrun or plain python: generate from a checkpoint folder
(split over the launched processes by tensor parallelism) and save this rank's tokens."""

import sys

import torch
import torch.distributed as dist

from llama.generation import Llama

PROMPTS = ["def fibonacci(n):", "The capital of France is Paris, and the capital of Italy is"]


def main(ckpt_dir: str, out_prefix: str):
    llm = Llama.build(ckpt_dir, max_seq_len=64, max_batch_size=2)
    prompt_tokens = [llm.tokenizer.encode(p) for p in PROMPTS]
    greedy, _ = llm.generate(prompt_tokens, max_gen_len=20, temperature=0)
    sampled, _ = llm.generate(prompt_tokens, max_gen_len=20, temperature=1.0, top_p=0.95, seed=3)
    with torch.no_grad():
        logits = llm.model(torch.tensor([prompt_tokens[0]]))[0].tolist()
    rank = dist.get_rank() if dist.is_initialized() else 0
    with open(f"{out_prefix}.{rank}", "w") as f:
        f.write(repr({"greedy": greedy, "sampled": sampled, "logits": logits}))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
