"""Plot a training run: PNG curves of loss (train and validation), learning rate, throughput and [eval] results.

    python -m llama.plot runs/tiny        # writes runs/tiny/{loss,lr,throughput}.png, and eval.png with [eval]

Needs matplotlib (``pip install matplotlib``); the curves are ``llama.training.plots``'s.
"""

from __future__ import annotations

from llama import cli
from llama.training.plots import plot

PROG = "python -m llama.plot"


def main(argv: list[str] | None = None):
    parser = cli.parser(PROG, __doc__)
    parser.add_argument("run_dir", help="a run folder holding metrics.jsonl (training's checkpoint.dir)")
    args = parser.parse_args(argv)
    for path in cli.run(PROG, plot, args.run_dir):
        print(path)


if __name__ == "__main__":
    main()
