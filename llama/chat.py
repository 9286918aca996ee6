"""Chat with a model in the terminal: ``python -m llama.chat [CKPT]`` (default: the embedded SmolLM2).

The reply is streamed as it is generated. The conversation is kept as long as it fits the context window; when it
no longer does, the oldest turns are dropped (and you are told). Commands: ``/system TEXT`` sets the system
prompt (and starts over), ``/reset`` forgets the conversation, ``/quit`` (or Ctrl-D) leaves; Ctrl-C stops a reply.
Reads plain lines from stdin, so it can be driven through a pipe. A turn that fails (a line that is not UTF-8 is
read with U+FFFD in place of its bad bytes) is reported, and the conversation goes on without it.
"""

from __future__ import annotations

import io
import sys

from llama import cli
from llama.generation import Llama
from llama.generation.sampling import SamplingParams
from llama.transforms.quantize import QUANTIZATIONS
from tokenizer import Dialog, encode_dialog

PROG = "python -m llama.chat"


def fit_history(llama: Llama, system: list[dict], history: Dialog, max_gen_len: int) -> tuple[Dialog, int]:
    """Drop the oldest (user, assistant) turns until the dialog leaves ``max_gen_len`` tokens of room; returns
    the history kept and the number of turns dropped."""
    dropped = 0
    while len(encode_dialog(llama.tokenizer, system + history)) + max_gen_len > llama.max_seq_len:
        if len(history) == 1:
            raise ValueError("this message alone does not fit in the context window; try a shorter one")
        history = history[2:]
        dropped += 1
    return history, dropped


def read_line() -> str:
    """The next line of input (EOFError at the end); bytes that are not UTF-8 become U+FFFD, with a notice."""
    line = input("> ")
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # the surrogates stdin's surrogateescape made of bytes that are not UTF-8
        line = line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        print("[that line is not valid UTF-8: its bad bytes were replaced by \ufffd]", file=sys.stderr)
    return line


def chat(llama: Llama, system: str | None, temperature: float, top_p: float, max_gen_len: int) -> None:
    history: Dialog = []
    print("Chat with the model. Commands: /system TEXT, /reset, /quit (or Ctrl-D).", file=sys.stderr)
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="surrogateescape")  # a bad byte is reported by read_line, not fatal
    while True:
        try:
            line = read_line()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        line = line.strip()
        if not line:
            continue
        if line == "/quit":
            return
        if line == "/reset":
            history = []
            print("[conversation reset]", file=sys.stderr)
            continue
        if line.startswith("/system"):
            system = line.removeprefix("/system").strip() or None
            history = []
            print(f"[system prompt {'set' if system else 'cleared'}; conversation reset]", file=sys.stderr)
            continue

        try:
            history = turn(llama, system, history, line, temperature, top_p, max_gen_len)
        except Exception as error:  # whatever failed, the conversation so far is kept
            print(f"[this turn failed and is left out of the conversation: {error}]", file=sys.stderr)


def turn(llama: Llama, system: str | None, history: Dialog, line: str, temperature: float, top_p: float,
         max_gen_len: int) -> Dialog:
    """Answer ``line`` after ``history``, streaming the reply; returns the history with both."""
    messages = [{"role": "system", "content": system}] if system else []
    history, dropped = fit_history(llama, messages, history + [{"role": "user", "content": line}], max_gen_len)
    if dropped:
        print(f"[context full: dropped the {dropped} oldest turn(s)]", file=sys.stderr)
    reply = ""
    try:
        for pieces in llama.stream_chat_completion([messages + history], temperature, top_p, max_gen_len):
            print(pieces[0], end="", flush=True)
            reply += pieces[0]
    except KeyboardInterrupt:
        print(" [stopped]", end="")
    print()
    return history + [{"role": "assistant", "content": reply}]


def check_options(args) -> None:
    """Refuse numbers that mean nothing before the model is loaded."""
    for name in ("max_seq_len", "max_gen_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    SamplingParams(temperature=args.temperature, top_p=args.top_p)  # names --temperature or --top_p when wrong


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(PROG, __doc__)
    parser.add_argument("ckpt", nargs="?", help="checkpoint folder or .gguf file (default: embedded SmolLM2)")
    parser.add_argument("--tokenizer_path", help="tokenizer file or folder (default: beside the checkpoint)")
    parser.add_argument("--adapter", help="a peft LoRA adapter folder (llama.train's RUN/adapter) to apply unmerged")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--temperature", type=float, default=0.6, help="0: greedy")
    parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling: the probability mass kept")
    parser.add_argument("--max_seq_len", type=int, default=2048, help="context window of the conversation")
    parser.add_argument("--max_gen_len", type=int, default=512, help="longest reply, in tokens")
    parser.add_argument("--seed", type=int, default=1, help="seeds the sampling")
    parser.add_argument("--compile", action="store_true", help="compile the decode step (torch.compile)")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, help="weight-only int8 or grouped int4 linears")
    args = parser.parse_args(argv)
    cli.run(PROG, check_options, args)

    try:
        if args.ckpt is None:
            from llama.checkpoint.embedded import default_checkpoint

            args.ckpt = cli.run(PROG, default_checkpoint)
        llama = cli.run(
            PROG, Llama.build, args.ckpt, args.tokenizer_path, args.max_seq_len, max_batch_size=1, seed=args.seed,
            compile=args.compile, quantize=args.quantize, adapter=args.adapter,
        )
        chat(llama, args.system, args.temperature, args.top_p, min(args.max_gen_len, llama.max_seq_len // 2))
    except KeyboardInterrupt:  # while loading, or a second Ctrl-C while stopping a reply
        print(file=sys.stderr)


if __name__ == "__main__":
    main()
