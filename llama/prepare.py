"""Tokenize a corpus into shards for ``python -m llama.train``.

    python -m llama.prepare --input src/ data/*.jsonl.gz --tokenizer tokenizer.model --output shards/ \
        [--val_fraction 0.01] [--workers 8] [--add_tokens "<fim_prefix>" ...] [--fim_rate 0.9 --fim_spm_rate 0.5]

    python -m llama.prepare --format chat --input chats.jsonl --tokenizer CKPT --output sft/ [--last_turn_only]

Inputs are files, folders, globs or comma lists of them (``tokenizer.corpus``); the shards and their index are
``llama.training.shards``'s. ``--format chat`` reads conversations (or preference pairs, for DPO) and renders
them with the checkpoint's chat format, with a loss mask (``llama.training.chat_data``).
"""

from __future__ import annotations

import json

from llama import cli
from llama.training.data import INDEX
from llama.training.chat_data import prepare_chat
from llama.training.fim import FimOptions
from llama.training.shards import prepare

PROG = "python -m llama.prepare"


def main(argv: list[str] | None = None):
    parser = cli.parser(PROG, __doc__)
    parser.add_argument("--input", nargs="+", required=True, help="files, folders, glob patterns or comma lists")
    parser.add_argument("--tokenizer", required=True, help="tokenizer file or checkpoint folder")
    parser.add_argument("--output", required=True, help="shard folder to create")
    parser.add_argument("--val_fraction", type=float, default=0.01, help="share of documents held out")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per .bin file at most")
    parser.add_argument("--exclude", nargs="*", default=[], help="skip folder/file names matching these patterns")
    parser.add_argument("--add_tokens", nargs="*", default=[],
                        help="control tokens added to the vocabulary (train with the same --model.add_tokens)")
    parser.add_argument("--fim_rate", type=float, default=0.0,
                        help="share of documents cut for fill-in-the-middle (Code Llama: 0.9); needs FIM tokens")
    parser.add_argument("--fim_spm_rate", type=float, default=0.5, help="share of those laid out suffix first")
    parser.add_argument("--fim_seed", type=int, default=0, help="seeds each document's cut with its number")
    parser.add_argument("--format", choices=("text", "chat"), default="text",
                        help="text: documents; chat: rows of messages, prompt/completion or preference pairs "
                             "(.jsonl, .jsonl.gz, .parquet) rendered with the tokenizer's chat format")
    parser.add_argument("--last_turn_only", action="store_true",
                        help="chat: train only the last assistant turn of each conversation")
    args = parser.parse_args(argv)
    if args.format == "chat":
        out = cli.run(PROG, prepare_chat, args.input, args.tokenizer, args.output, args.val_fraction,
                      args.last_turn_only, args.shard_tokens)
    else:
        fim = FimOptions(args.fim_rate, args.fim_spm_rate, args.fim_seed)
        out = cli.run(PROG, prepare, args.input, args.tokenizer, args.output, args.val_fraction, args.workers,
                      args.shard_tokens, args.exclude, args.add_tokens, fim)
    index = json.loads((out / INDEX).read_text())
    if args.format == "chat":
        train, val = index["splits"]["train"], index["splits"]["val"]
        print(f"{out}: {index['rows']:,} {index['format']} rows, {index['documents']:,} samples, "
              f"{index['tokens']:,} tokens (train {train['trained_tokens']:,} trained of {train['tokens']:,}; "
              f"val {val['trained_tokens']:,} of {val['tokens']:,}); boundary mismatches: "
              f"{index['boundary_mismatches']}")
        return
    print(f"{out}: {index['tokens']:,} tokens in {index['documents']:,} documents "
          f"(train {index['splits']['train']['tokens']:,}, val {index['splits']['val']['tokens']:,}), {index['dtype']}"
          + (f"; fill-in-the-middle: {index['fim']['psm_documents']:,} PSM, {index['fim']['spm_documents']:,} SPM"
             if "fim" in index else ""))


if __name__ == "__main__":
    main()
