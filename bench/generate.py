"""Generation speed: time to first token and decode tokens/s of our ``Llama`` (eager, compiled, int8, int4
and their compiled forms) against transformers' ``LlamaForCausalLM.generate`` on the same weights, dtype and
machine, in the same run. Where the model is a GGUF file and ``llama_cpp`` (llama-cpp-python) is installed,
llama.cpp on that very file joins them at batch 1 (its Python API decodes one sequence).

    python -m bench.generate                  # CPU: SmolLM2-135M fp32, 2 threads; GPU: random Llama-3 8B and 1B, bf16
    python -m bench.generate --quick          # a tiny random model and a few tokens (what the tests run)
    python -m bench.generate --variants eager,int8 --batch_sizes 1 --gen_tokens 32 --output /tmp/results

Definitions: TTFT is the time of a whole ``generate`` of one token (prefill + first sample). Decode tokens/s per
sequence is (tokens generated - 1) / (time of N tokens - TTFT); aggregate tokens/s is that times the batch size.
On GPU, MBU = weight bytes read per decode step × steps/s ÷ memory bandwidth measured in this run.
"""

from __future__ import annotations

import gc
import importlib.util
import tempfile
from functools import partial
from pathlib import Path

import fire
import torch

from bench.common import memory_bandwidth, print_table, real_text, timed, timed_in_turns, write_result
from llama.checkpoint import save_hf
from llama.checkpoint.embedded import default_checkpoint, smollm2_gguf
from llama.generation import Llama
from llama.model import ModelArgs, Transformer
from tokenizer import load_tokenizer

VARIANTS = {  # name: (compile, quantize)
    "eager": (False, None),
    "compiled": (True, None),
    "int8": (False, "int8"),
    "compiled+int8": (True, "int8"),
    "int4": (False, "int4"),
    "compiled+int4": (True, "int4"),
}
# Random-weight shapes benchmarked on GPU (Llama 3 8B and Llama 3.2 1B).
SHAPES = {
    "llama3-8b-shape": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                                 multiple_of=1024, ffn_dim_multiplier=1.3, rope_theta=500000.0),
    "llama3.2-1b-shape": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256,
                                   hidden_dim=8192, rope_theta=500000.0, tie_embeddings=True),
}
TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152, multiple_of=32)
PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press into a system that could produce books"
)
BATCH_LENGTH_STEP = 3  # row i of a batch has i * BATCH_LENGTH_STEP fewer prompt tokens: left padding is exercised


def batch_prompts(prompt: list[int], batch: int) -> list[list[int]]:
    return [prompt[: len(prompt) - i * BATCH_LENGTH_STEP] for i in range(batch)]


def decode_weight_bytes(model: Transformer) -> int:
    """Bytes of weights one decode step reads: the blocks, the final norm and the output projection (the tied
    embedding when there is none); the input embedding is a lookup of one row per token and is left out."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper
    output = model.output if model.output is not None else model.tok_embeddings
    tensors = [t for m in (model.layers, model.norm, output) for n, t in [*m.named_parameters(), *m.named_buffers()]
               if "kv_cache" not in n]
    return sum(t.numel() * t.element_size() for t in tensors)


def hf_generator(folder: Path, dtype, device, pad_id: int):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device).eval()

    @torch.inference_mode()
    def generate(prompts: list[list[int]], n: int) -> int:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=pad_id)
        return out.shape[1] - width

    return generate


def llama_cpp_generator(gguf: Path, max_seq_len: int):
    """llama.cpp (llama-cpp-python) on the GGUF file, greedy, batch 1, with this process's thread count."""
    from llama_cpp import Llama as LlamaCpp

    threads = torch.get_num_threads()
    llm = LlamaCpp(str(gguf), n_ctx=max_seq_len, n_batch=max_seq_len, n_threads=threads, n_threads_batch=threads,
                   verbose=False)

    def generate(prompts: list[list[int]], n: int) -> int:
        (prompt,) = prompts
        llm.reset()  # each run prefills the whole prompt again, as ours and transformers' do
        tokens = llm.generate(prompt, top_k=1, temp=0.0)  # yields tokens until told to stop
        return sum(1 for _, _ in zip(range(n), tokens))

    return generate


def peers(gguf: Path | None, device: torch.device) -> list[str]:
    """The other systems measured: transformers always; llama.cpp on CPU where the weights come from a GGUF file."""
    found = ["transformers"]
    if device.type == "cpu" and gguf is not None and importlib.util.find_spec("llama_cpp") is not None:
        found.append("llama.cpp")
    return found


def our_generator(folder: Path, dtype, device, max_seq_len: int, max_batch_size: int, variant: str):
    """Our ``generate`` through ``Llama``, and the weight bytes one decode step reads."""
    compile, quantize = VARIANTS[variant]
    llm = Llama.build(folder, max_seq_len=max_seq_len, max_batch_size=max_batch_size, device=device, dtype=dtype,
                      compile=compile, quantize=quantize)

    def generate(prompts: list[list[int]], n: int) -> int:
        llm.engine.reset()  # no prefix kept from the run before: each run prefills the whole prompt, as the peers do
        tokens, _ = llm.generate(prompts, max_gen_len=n, temperature=0)
        return max(len(t) for t in tokens)

    return generate, decode_weight_bytes(llm.model)


def bench_checkpoint(name, folder, dtype, device, prompt, gen_tokens, batch_sizes, variants, repeats, bandwidth,
                     gguf=None):
    """Rows for the peers (transformers, and llama.cpp at batch 1 on ``gguf``, the file ``folder`` was converted
    from) then each of our variants, on the checkpoint in ``folder``.

    Each variant is warmed up first (compilation happens there), then TTFT and N-token runs are timed, best of
    ``repeats``. On CPU all variants are loaded together and timed in turns, so that load from other processes
    falls on all alike; on GPU (large models) one variant is loaded at a time."""
    tokenizer = load_tokenizer(folder)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    max_seq_len = len(prompt) + gen_tokens
    names = [*peers(gguf, device), *variants]
    batches = {name: [1] if name == "llama.cpp" else batch_sizes for name in names}
    groups = [names] if device.type == "cpu" else [[v] for v in names]
    rows = {}
    for group in groups:
        generators, weight_bytes = {}, {}
        for variant in group:
            if variant == "transformers":
                generators[variant] = hf_generator(folder, dtype, device, pad_id)
            elif variant == "llama.cpp":
                generators[variant] = llama_cpp_generator(gguf, max_seq_len)
            else:
                generators[variant], weight_bytes[variant] = our_generator(
                    folder, dtype, device, max_seq_len, max(batch_sizes), variant
                )
        runs = {}  # (variant, batch, tokens asked) -> run
        for variant, generate in generators.items():
            for batch in batches[variant]:
                prompts = batch_prompts(prompt, batch)
                counted = []
                warmup_s = timed(lambda: counted.append(generate(prompts, gen_tokens)), device)
                generate(prompts, 1)  # a one-token generate may take its own first-call paths too
                rows[variant, batch] = {"model": name, "variant": variant, "batch": batch,
                                        "prompt_tokens": len(prompt), "warmup_s": warmup_s,
                                        "gen_tokens": counted[0], "weight_bytes": weight_bytes.get(variant)}
                for n in (1, gen_tokens):
                    runs[variant, batch, n] = partial(generate, prompts, n)
        seconds = {key: min(s) for key, s in timed_in_turns(runs, repeats, device).items()}
        for variant in group:
            for batch in batches[variant]:
                row, ttft = rows[variant, batch], seconds[variant, batch, 1]
                row["ttft_ms"] = 1000 * ttft
                row["decode_tok_s"] = (row["gen_tokens"] - 1) / (seconds[variant, batch, gen_tokens] - ttft)
                row["aggregate_tok_s"] = row["decode_tok_s"] * batch
        del generators, runs, generate  # the last variant's model too, before the next one loads
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for (variant, batch), row in rows.items():
        hf = rows["transformers", batch]
        if variant == "transformers" and "eager" in variants:
            row["weight_bytes"] = rows["eager", batch]["weight_bytes"]  # the same weights
        row["x_vs_hf"] = ratio(row["decode_tok_s"], hf["decode_tok_s"])
        llama_cpp = rows.get(("llama.cpp", batch))
        row["x_vs_llama_cpp"] = ratio(row["decode_tok_s"], llama_cpp["decode_tok_s"]) if llama_cpp else None
        row["ttft_x_vs_hf"] = ratio(hf["ttft_ms"], row["ttft_ms"])
        # batch rows share each weight read, so bytes per step x steps per second
        row["mbu"] = ratio(row["weight_bytes"] * row["decode_tok_s"], bandwidth) if row["weight_bytes"] else None
    return [rows[v, b] for v in names for b in batches[v]]


def ratio(a, b):
    return a / b if a is not None and b else None


def random_checkpoint(args: ModelArgs, out_dir: Path, tokenizer, dtype, device) -> Path:
    """Random weights written as an HF folder, so that ours and transformers load the very same file."""
    with torch.device(device):
        model = Transformer(args).to(dtype)
    model.init_weights(seed=0)
    save_hf(model, out_dir, tokenizer=tokenizer)
    return out_dir


def main(
    quick: bool = False,
    variants: str | tuple = ",".join(VARIANTS),
    batch_sizes: int | tuple = (1, 8),
    gen_tokens: int | None = None,
    repeats: int = 2,
    threads: int = 2,
    device: str | None = None,
    models: str | tuple | None = None,
    prompt_tokens: int | None = None,
    output: str | None = None,
):
    """Benchmark and write ``generate-<device>-<time>.json`` into ``output`` (default bench/results/).
    ``models``: on GPU, some of the random-weight shapes (default all; one at a time fits a 10-minute slot).
    ``prompt_tokens``: a prompt of that many tokens (of the standard library's source on SmolLM2, random ids on
    random models) instead of the default 36-token sentence: the prefill (TTFT) of long prompts."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = models.split(",") if isinstance(models, str) else list(models or SHAPES)
    if unknown := [m for m in models if m not in SHAPES]:
        raise ValueError(f"--models {unknown}: expected some of {list(SHAPES)}")
    variants = variants.split(",") if isinstance(variants, str) else list(variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants {unknown}: expected some of {list(VARIANTS)}")
    batch_sizes = [batch_sizes] if isinstance(batch_sizes, int) else list(batch_sizes)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen_tokens = gen_tokens or (8 if quick else 64 if device.type == "cpu" else 256)
    bandwidth = memory_bandwidth(device)
    smollm2 = default_checkpoint()
    smollm2_tokenizer = load_tokenizer(smollm2)
    # Random models get random prompt ids (ordinary tokens, above the special ones); SmolLM2 a real text.
    random_prompt = torch.randint(100, smollm2_tokenizer.vocab_size, (prompt_tokens or 40,),
                                  generator=torch.Generator().manual_seed(0)).tolist()
    text_prompt = smollm2_tokenizer.encode(real_text(8 * prompt_tokens))[:prompt_tokens] if prompt_tokens else None

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if quick:
            checkpoints = {"tiny-random": TINY}
        elif device.type == "cuda":
            checkpoints = {name: SHAPES[name] for name in models}
        else:
            checkpoints = {"SmolLM2-135M": smollm2}
        for name, source in checkpoints.items():
            if isinstance(source, ModelArgs):
                folder = random_checkpoint(source, Path(tmp) / name, smollm2_tokenizer, dtype, device)
                prompt, gguf = random_prompt, None
            else:  # SmolLM2: the fp32 folder converted from its GGUF file, which llama.cpp reads
                folder, prompt, gguf = source, text_prompt or smollm2_tokenizer.encode(PROMPT), smollm2_gguf()
            rows += bench_checkpoint(name, folder, dtype, device, prompt, gen_tokens, batch_sizes, variants,
                                     repeats, bandwidth, gguf)

    print_table(rows, ["model", "variant", "batch", "warmup_s", "ttft_ms", "ttft_x_vs_hf", "decode_tok_s",
                       "aggregate_tok_s", "x_vs_hf", "x_vs_llama_cpp", "mbu"])
    path = write_result("generate", device, rows, out_dir=output, dtype=str(dtype).removeprefix("torch."),
                        bandwidth_bytes_s=bandwidth)
    print(f"wrote {path}")


if __name__ == "__main__":
    fire.Fire(main)
