"""Serve a model over an OpenAI-compatible HTTP API: ``python -m llama.serve [CKPT]`` (default: the embedded
SmolLM2), on 127.0.0.1:8000 unless told otherwise.

Routes: POST /v1/completions (with "suffix": Code Llama infilling), /v1/chat/completions (with "tools": Llama 3.1
tool calls; both streamed with "stream": true), GET /v1/models, POST /tokenize,
/detokenize, GET /health (liveness), /health/ready (a one-token generation under a deadline), /metrics
(Prometheus). Requests are batched continuously: each joins the running batch at the next engine step. With
--api-key (or --api-key-file) every route but /health wants ``Authorization: Bearer KEY``. Under
``torchrun --nproc_per_node N`` the model is split over the N processes by tensor parallelism: rank 0 serves HTTP
and every rank steps the engine.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from llama import cli
from llama.generation import Llama
from llama.transforms.quantize import QUANTIZATIONS

PROG = "python -m llama.serve"


def read_api_key(api_key: str | None, api_key_file: str | None) -> str | None:
    if api_key_file is None:
        return api_key
    path = Path(api_key_file)
    try:
        key = path.read_text().strip()
    except OSError as error:
        raise ValueError(f"--api-key-file {path}: cannot read it ({error.strerror})") from None
    if not key:
        raise ValueError(f"--api-key-file {path} is empty")
    return key


def serve(args) -> None:
    import uvicorn

    from llama.serving import Scheduler, create_app

    api_key = read_api_key(args.api_key, args.api_key_file)
    for name in ("max_batch_size", "max_seq_len", "max_queue", "prefill_chunk"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be >= {0 if name == 'max_queue' else 1}")
    if args.ckpt is None:
        from llama.checkpoint.embedded import default_checkpoint

        args.ckpt = default_checkpoint()
    # The engine steps in a thread of its own. An OpenMP team started by this thread (which serves HTTP and does no
    # tensor work after loading) stays for the life of the process even idle, and with more OpenMP threads than
    # cores libgomp parks the engine's workers between parallel regions: a decode step ~3x slower (6 -> 18 ms,
    # SmolLM2 int4 on 2 cores). So this thread loads the model with one thread and the engine takes them all.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    llm = Llama.build(args.ckpt, args.tokenizer_path, args.max_seq_len, args.max_batch_size, seed=args.seed,
                      compile=args.compile, quantize=args.quantize, prefill_chunk=args.prefill_chunk)
    name = args.served_model_name or Path(args.ckpt).stem
    if dist.is_initialized() and dist.get_rank() > 0:  # a tensor-parallel follower: steps the engine, no HTTP
        # torchrun signals every rank at shutdown: a follower leaves when rank 0's server tells it to
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        warmup = [llm.tokenizer.bos_id if llm.tokenizer.bos_id is not None else 0]
        Scheduler(llm.engine, args.max_queue, warmup_prompt=warmup, threads=threads).follow()
    else:
        app = create_app(llm, name, api_key, args.max_queue, args.max_body_bytes, args.ready_timeout, threads)
        logging.getLogger("llama.serving").setLevel(logging.INFO)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(PROG, __doc__)
    parser.add_argument("ckpt", nargs="?", help="checkpoint folder or .gguf file (default: embedded SmolLM2)")
    parser.add_argument("--tokenizer_path", "--tokenizer-path",
                        help="tokenizer file or folder (default: beside the checkpoint)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument("--api-key", "--api_key", dest="api_key", help="require 'Authorization: Bearer KEY'")
    keys.add_argument("--api-key-file", "--api_key_file", dest="api_key_file", help="read the API key from a file")
    parser.add_argument("--max-batch-size", "--max_batch_size", dest="max_batch_size", type=int, default=8,
                        help="cache slots: requests generating at once")
    parser.add_argument("--max-seq-len", "--max_seq_len", dest="max_seq_len", type=int, default=2048,
                        help="context of each slot: prompt plus completion (capped by the model's)")
    parser.add_argument("--max-queue", "--max_queue", dest="max_queue", type=int, default=64,
                        help="requests that may wait for a slot; beyond, 429 with Retry-After")
    parser.add_argument("--prefill-chunk", "--prefill_chunk", dest="prefill_chunk", type=int, default=256,
                        help="prompt tokens prefilled per step and request, between decode steps")
    parser.add_argument("--compile", action="store_true", help="compile the decode step (one graph per batch bucket)")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, help="weight-only int8 or grouped int4 linears")
    parser.add_argument("--served-model-name", "--served_model_name", dest="served_model_name",
                        help="the model name clients use (default: the checkpoint's file or folder name)")
    parser.add_argument("--seed", type=int, default=1, help="seeds the requests that bring no seed")
    parser.add_argument("--max-body-bytes", "--max_body_bytes", dest="max_body_bytes", type=int, default=4 << 20,
                        help="larger request bodies get 413")
    parser.add_argument("--ready-timeout", "--ready_timeout", dest="ready_timeout", type=float, default=10.0,
                        help="seconds /health/ready waits for its one-token generation")
    parser.add_argument("--log-level", "--log_level", dest="log_level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(argv)
    cli.run(PROG, serve, args)


if __name__ == "__main__":
    main()
