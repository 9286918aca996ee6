"""Train: pretraining or continued pretraining with FSDP2, exact resume and a Hugging Face export.

    torchrun --nproc_per_node 8 -m llama.train --config examples/configs/tiny.toml [--section.key=value ...]
    python -m llama.train --config ...          # one process
    python -m llama.train --help                # every configuration key, its default and its meaning

The run itself is ``llama.training.trainer``; the configuration ``llama.training.config``.
"""

from __future__ import annotations

import os
import sys

from llama.checkpoint import CheckpointError
from llama.training.config import ConfigError, load_config
from llama.training.data import ShardError
from llama.training.metrics import MetricsError
from llama.training.resume import ResumeError
from llama.training.trainer import TrainingDiverged, train
from tokenizer import TokenizerError

USER_ERRORS = (
    ConfigError, ShardError, CheckpointError, ResumeError, MetricsError, TokenizerError, OSError, TrainingDiverged,
)


def main(argv: list[str] | None = None):
    try:
        train(load_config(argv, prog="python -m llama.train", description=__doc__.split("\n\n")[0]))
    except USER_ERRORS as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"python -m llama.train: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
