"""Run by tests/llama/test_parallel.py under torchrun: greedy-decode a seeded tiny model with tensor
parallelism over all launched ranks and save rank 0's tokens and logits."""

import sys

import torch
import torch.distributed as dist

from llama.model import ModelArgs, Transformer
from llama.parallel import apply_tensor_parallel, init_tensor_parallel_mesh

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=96, hidden_dim=128, max_seq_len=64)


def greedy(model: Transformer, prompt: torch.Tensor, steps: int):
    model.setup_caches(prompt.shape[0], ARGS.max_seq_len)
    logits = model(prompt, input_pos=torch.arange(prompt.shape[1]))[:, -1]
    tokens, all_logits = [], [logits]
    for pos in range(prompt.shape[1], prompt.shape[1] + steps):
        next_token = logits.argmax(-1, keepdim=True)
        tokens.append(next_token)
        logits = model(next_token, input_pos=torch.tensor([pos]))[:, -1]
        all_logits.append(logits)
    return torch.cat(tokens, 1), torch.stack(all_logits, 1)


@torch.inference_mode()
def main(out_path: str):
    torch.manual_seed(0)
    model = Transformer(ARGS)
    model.init_weights(std=0.2, seed=0)  # a large std makes the greedy path non-trivial
    if dist.is_torchelastic_launched():
        apply_tensor_parallel(model, init_tensor_parallel_mesh(torch.device("cpu")))
    prompt = torch.randint(0, ARGS.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    tokens, logits = greedy(model.eval(), prompt, steps=20)
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save({"tokens": tokens, "logits": logits}, out_path)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
