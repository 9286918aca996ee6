"""Serving under load, in the manner of ``vllm bench serve``: our OpenAI-compatible server (``llama.serve``) and,
when its binary is given, llama.cpp's ``llama-server`` on the same GGUF file, each started here on 127.0.0.1 and
sent the same requests in the same run.

    python -m bench.serve                                   # SmolLM2 GGUF, ours only
    python -m bench.serve --llama_server /path/to/llama-server
    python -m bench.serve --quick --output /tmp/r           # a few short requests (what the tests run)

Scenarios (each bounded by ``num_prompts`` requests and ``max_seconds``): fixed concurrency (``concurrency``), Poisson
arrivals at each of ``rates`` requests/s, and a shared system prompt of ``shared_prefix_tokens`` tokens asked one
question after another (its first request prefills the prefix cold, the next ones find it cached). Prompts are
windows of real text (the Python standard library's sources on this machine), ``prompt_tokens`` long, each asking
for exactly ``output_tokens`` tokens (end-of-text tokens biased away), greedy, streamed.

Per request: TTFT (to the first streamed text), TPOT = (E2E - TTFT) / (output tokens - 1), ITL (gaps between
streamed chunks) and E2E; reported as p50/p90/p99 with output tok/s, requests/s and goodput (requests/s meeting
TTFT <= ``ttft_limit_s`` and TPOT <= ``tpot_limit_s``). Our ``Llama.generate`` at batch 1 with the same options gives
the time per output token a served request at concurrency 1 is compared with (measured just before it). All
servers are started first and each load is sent to each in turn, so that other work on a shared machine falls on
them alike.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import fire
import httpx
import numpy as np
import torch

from bench.common import print_table, real_text, timed, write_result
from llama.checkpoint.embedded import default_checkpoint, smollm2_gguf
from llama.generation import Request, SamplingParams
from tokenizer import load_tokenizer

HOST = "127.0.0.1"  # loopback only


# ------------------------------------------------------------------------------------------------ prompts


def text_windows(tokenizer, n: int, tokens: int, rng: random.Random) -> list[str]:
    """``n`` windows of ``tokens`` tokens each from the real text, at random places, as text."""
    ids = tokenizer.encode(real_text(40 * tokens + 400_000))
    starts = [rng.randrange(len(ids) - tokens) for _ in range(n)]
    return [tokenizer.decode(ids[s : s + tokens]) for s in starts]


# ------------------------------------------------------------------------------------------------ servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextmanager
def server(command: list[str], port: int, env: dict | None = None, ready_path: str = "/health",
           timeout_s: float = 900):
    """Start a server process and wait until ``ready_path`` answers 200; stopped on leaving."""
    process = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command[0]} exited with status {process.returncode} while starting")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[0]} was not ready within {timeout_s} s")
            try:
                if httpx.get(url + ready_path, timeout=30).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def ours_command(ckpt: Path, port: int, slots: int, max_seq_len: int, compile: bool, quantize: str | None) -> list[str]:
    command = [sys.executable, "-m", "llama.serve", str(ckpt), "--port", str(port), "--max-batch-size", str(slots),
               "--max-seq-len", str(max_seq_len), "--served-model-name", "bench", "--log-level", "warning"]
    return command + ["--compile"] * compile + (["--quantize", quantize] if quantize else [])


def llama_server_command(binary: str, gguf: Path, port: int, slots: int, max_seq_len: int, threads: int) -> list[str]:
    # -c is split over the -np slots: each slot gets c / np positions
    return [binary, "-m", str(gguf), "--host", HOST, "--port", str(port), "-np", str(slots), "-t", str(threads),
            "-tb", str(threads), "-c", str(slots * max_seq_len), "--cont-batching", "--alias", "bench"]


# ------------------------------------------------------------------------------------------------ the client


async def one_request(client: httpx.AsyncClient, url: str, body: dict, chat: bool) -> dict:
    """Send one streamed request; times of its streamed text chunks and its token counts."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    chunks, usage, status = [], None, None
    async with client.stream("POST", url + path, json=body) as response:
        status = response.status_code
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                text = choice["delta"].get("content") if chat else choice.get("text")
                if text:
                    chunks.append(time.perf_counter())
    end = time.perf_counter()
    out = (usage or {}).get("completion_tokens") or len(chunks)
    ok = status == 200 and bool(chunks)
    return {"ok": ok, "start": start, "end": end, "ttft": chunks[0] - start if ok else None,
            "itl": list(np.diff(chunks)), "e2e": end - start, "output_tokens": out,
            "prompt_tokens": (usage or {}).get("prompt_tokens"),
            "cached_tokens": ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens")}


async def run_load(url: str, bodies: list[dict], chat: bool, concurrency: int | None, rate: float | None,
                   seed: int, max_seconds: float) -> tuple[list[dict], float]:
    """Send ``bodies`` at a fixed concurrency or as Poisson arrivals at ``rate``/s; (results, duration)."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=len(bodies) + 1, max_keepalive_connections=len(bodies) + 1)
    async with httpx.AsyncClient(timeout=max_seconds, limits=limits) as client:
        gate = asyncio.Semaphore(concurrency) if concurrency else None

        async def send(body, delay):
            await asyncio.sleep(delay)
            if gate is None:
                return await one_request(client, url, body, chat)
            async with gate:
                return await one_request(client, url, body, chat)

        delays, t = [], 0.0
        for _ in bodies:
            delays.append(t)
            if rate:
                t += rng.expovariate(rate)  # Poisson arrivals (vLLM's gamma with burstiness 1)
        start = time.perf_counter()
        tasks = [asyncio.ensure_future(send(b, d)) for b, d in zip(bodies, delays)]
        done, pending = await asyncio.wait(tasks, timeout=max_seconds)
        for task in pending:
            task.cancel()
        results = [t.result() for t in done if not t.cancelled() and t.exception() is None]
        duration = max((r["end"] for r in results), default=start) - start
    return results, duration


def summarize(results: list[dict], duration: float, sent: int, ttft_limit_s: float, tpot_limit_s: float) -> dict:
    ok = [r for r in results if r["ok"]]
    for r in ok:
        r["tpot"] = (r["e2e"] - r["ttft"]) / (r["output_tokens"] - 1) if r["output_tokens"] > 1 else None
    row = {"sent": sent, "completed": len(ok), "duration_s": duration,
           "output_tok_s": sum(r["output_tokens"] for r in ok) / duration if duration else None,
           "req_s": len(ok) / duration if duration else None,
           "mean_output_tokens": float(np.mean([r["output_tokens"] for r in ok])) if ok else None,
           "mean_prompt_tokens": float(np.mean([r["prompt_tokens"] or 0 for r in ok])) if ok else None}
    good = [r for r in ok if r["ttft"] <= ttft_limit_s and (r["tpot"] or 0) <= tpot_limit_s]
    row["goodput_req_s"] = len(good) / duration if duration else None
    metrics = {"ttft": [r["ttft"] for r in ok], "tpot": [r["tpot"] for r in ok if r["tpot"] is not None],
               "itl": [x for r in ok for x in r["itl"]], "e2e": [r["e2e"] for r in ok]}
    for name, values in metrics.items():
        for p in (50, 90, 99):
            row[f"{name}_p{p}_ms"] = 1000 * float(np.percentile(values, p)) if values else None
    return row


# ------------------------------------------------------------------------------------------------ scenarios


def completion_bodies(prompts: list[str], output_tokens: int, stop_ids) -> list[dict]:
    bias = {str(t): -100 for t in stop_ids}  # exactly output_tokens tokens from both servers
    return [{"model": "bench", "prompt": p, "max_tokens": output_tokens, "temperature": 0, "logit_bias": bias}
            for p in prompts]


def scenarios(tokenizer, num_prompts, prompt_tokens, output_tokens, concurrency, rates, shared_prefix_tokens, seed):
    """(name, bodies, chat, concurrency, rate) of every load."""
    rng = random.Random(seed)
    loads = []
    for c in concurrency:
        bodies = completion_bodies(text_windows(tokenizer, num_prompts, prompt_tokens, rng), output_tokens,
                                   tokenizer.stop_ids)
        loads.append((f"concurrency {c}", bodies, False, c, None))
    for rate in rates:
        bodies = completion_bodies(text_windows(tokenizer, num_prompts, prompt_tokens, rng), output_tokens,
                                   tokenizer.stop_ids)
        loads.append((f"poisson {rate:g}/s", bodies, False, None, rate))
    if shared_prefix_tokens:
        system = text_windows(tokenizer, 1, shared_prefix_tokens, rng)[0]
        questions = text_windows(tokenizer, 6, 24, rng)
        bodies = [{"model": "bench", "temperature": 0, "max_tokens": 16,
                   "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}]}
                  for q in questions]
        loads.append(("shared prefix", bodies, True, 1, None))
    return loads


def generate_timer(ckpt: Path, prompt: str, output_tokens: int, compile: bool, quantize: str | None,
                   max_seq_len: int):
    """A function timing ``Llama.generate`` at batch 1 with the server's options: seconds per output token
    (decode only). Loaded and warmed up (compiled) here."""
    from llama.generation import Llama

    llm = Llama.build(ckpt, max_seq_len=max_seq_len, max_batch_size=1, compile=compile, quantize=quantize)
    tokens = llm.tokenizer.encode(prompt)
    stops = {t: -100 for t in llm.tokenizer.stop_ids}  # exactly output_tokens tokens, as the served requests

    def run(n):
        return llm.complete([Request(tokens, SamplingParams(temperature=0, max_tokens=n, logit_bias=stops))])

    run(output_tokens), run(1)  # warm-up (compilation)
    device = torch.device("cpu")

    def tpot() -> float:
        first = min(timed(lambda: run(1), device) for _ in range(2))
        whole = min(timed(lambda: run(output_tokens), device) for _ in range(2))
        return (whole - first) / (output_tokens - 1)

    return tpot


def main(
    ckpt: str | None = None,
    llama_server: str | None = None,
    concurrency: int | tuple = (1, 8),
    rates: float | tuple = (0.5, 1, 2, 4),
    num_prompts: int = 32,
    prompt_tokens: int = 128,
    output_tokens: int = 128,
    shared_prefix_tokens: int = 2000,
    slots: int = 8,
    compile: bool = True,
    quantize: str | None = "int4",
    threads: int = 2,
    ttft_limit_s: float = 1.0,
    tpot_limit_s: float = 0.1,
    seed: int = 0,
    max_seconds: float = 300,
    quick: bool = False,
    output: str | None = None,
):
    """Run every scenario against our server (and llama-server) and write ``serve-cpu-<time>.json``."""
    if llama_server is not None and not Path(llama_server).is_file():
        raise ValueError(f"--llama_server {llama_server}: no such file")
    concurrency = [concurrency] if isinstance(concurrency, int) else list(concurrency)
    rates = [rates] if isinstance(rates, (int, float)) else list(rates)
    if quick:  # a tiny random model with SmolLM2's tokenizer, a few short requests: what the tests run
        concurrency, rates, num_prompts, prompt_tokens, output_tokens = [1, 2], [4], 4, 16, 8
        shared_prefix_tokens, compile, quantize, max_seconds = 64, False, None, 60
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(ckpt) if ckpt else tiny_checkpoint(Path(tmp)) if quick else smollm2_gguf()
        if llama_server is not None and model.suffix != ".gguf":
            raise ValueError(f"--llama_server needs a .gguf checkpoint, got {model}")
        rows = run_all(model, llama_server, concurrency, rates, num_prompts, prompt_tokens, output_tokens,
                              shared_prefix_tokens, slots, compile, quantize, threads, ttft_limit_s, tpot_limit_s,
                              seed, max_seconds)
    print_table(rows, ["server", "scenario", "completed", "output_tok_s", "req_s", "goodput_req_s", "ttft_p50_ms",
                       "ttft_p99_ms", "tpot_p50_ms", "itl_p50_ms", "e2e_p50_ms", "warm_over_cold",
                       "tpot_over_generate"])
    path = write_result("serve", torch.device("cpu"), rows, out_dir=output, checkpoint=model.name, slots=slots,
                        compile=compile, quantize=quantize, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                        ttft_limit_s=ttft_limit_s, tpot_limit_s=tpot_limit_s, seed=seed)
    print(f"wrote {path}")


def tiny_checkpoint(folder: Path) -> Path:
    """A random 2-layer model with SmolLM2's tokenizer, as an HF folder."""
    from llama.checkpoint import save_hf
    from llama.model import ModelArgs, Transformer

    tokenizer = load_tokenizer(default_checkpoint())  # SmolLM2's converted folder: quicker to read than the GGUF
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.vocab_size,
                                  multiple_of=32, max_seq_len=512))
    model.init_weights(seed=0)
    save_hf(model, folder / "tiny-random", tokenizer=tokenizer)
    return folder / "tiny-random"


def run_all(model, llama_server, concurrency, rates, num_prompts, prompt_tokens, output_tokens, shared_prefix_tokens,
            slots, compile, quantize, threads, ttft_limit_s, tpot_limit_s, seed, max_seconds):
    tokenizer = load_tokenizer(model)
    max_seq_len = max(prompt_tokens, shared_prefix_tokens + 64) + output_tokens + 64
    torch.set_num_threads(threads)
    loads = scenarios(tokenizer, num_prompts, prompt_tokens, output_tokens, concurrency, rates, shared_prefix_tokens,
                      seed)
    generate_tpot = generate_timer(model, loads[0][1][0]["prompt"], output_tokens, compile, quantize, max_seq_len)

    commands = {"ours": ours_command(model, free_port(), slots, max_seq_len, compile, quantize)}
    if llama_server:
        commands["llama-server"] = llama_server_command(llama_server, model, free_port(), slots, max_seq_len, threads)
    rows = []
    with ExitStack() as stack:  # all servers up at once (idle ones take no CPU), each load sent to each in turn
        urls = {}
        for name, command in commands.items():
            port = int(command[command.index("--port") + 1])
            env = {"OMP_NUM_THREADS": str(threads)}
            if name == "llama-server":
                env["LD_LIBRARY_PATH"] = str(Path(llama_server).parent)
            ready = "/health/ready" if name == "ours" else "/health"
            urls[name] = stack.enter_context(server(command, port, env, ready))
        for load, bodies, chat, c, rate in loads:
            for name, url in urls.items():
                # Llama.generate's time per token just before, under the same load of the machine
                reference = generate_tpot() if name == "ours" and c == 1 and load.startswith("concurrency") else None
                results, duration = asyncio.run(run_load(url, bodies, chat, c, rate, seed, max_seconds))
                row = {"server": name, "scenario": load, **summarize(results, duration, len(bodies), ttft_limit_s,
                                                                     tpot_limit_s)}
                if load == "shared prefix" and results:
                    ordered = sorted(results, key=lambda r: r["start"])
                    row["cold_ttft_ms"] = 1000 * ordered[0]["ttft"]
                    row["warm_ttft_ms"] = 1000 * float(np.median([r["ttft"] for r in ordered[1:]]))
                    row["warm_over_cold"] = row["warm_ttft_ms"] / row["cold_ttft_ms"]
                if reference is not None:
                    row["generate_tpot_ms"] = 1000 * reference
                    row["tpot_over_generate"] = row["tpot_p50_ms"] / row["generate_tpot_ms"]
                rows.append(row)
                print(f"{name:13s} {load:16s} done: {row['completed']}/{row['sent']} in {duration:.1f} s", flush=True)
    for name in commands:  # the servers' ratios, scenario by scenario
        if name != "ours":
            for mine, theirs in zip(rows[::len(commands)], rows[list(commands).index(name)::len(commands)]):
                mine[f"output_tok_s_x_{name}"] = ratio(mine["output_tok_s"], theirs["output_tok_s"])
                mine[f"ttft_p50_x_{name}"] = ratio(theirs["ttft_p50_ms"], mine["ttft_p50_ms"])
    return rows


def ratio(a, b):
    return a / b if a is not None and b else None


if __name__ == "__main__":
    fire.Fire(main)
