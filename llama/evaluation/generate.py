"""Running many generation requests through the engine for an evaluation."""

from __future__ import annotations

from tqdm import tqdm

from llama.generation import Engine, Request


def complete(engine: Engine, requests: list[Request], desc: str = "generating", progress: bool = False) -> None:
    """Run ``requests`` to the end, submitted longest prompt first: slots freed together are refilled with prompts
    of similar lengths, so a prefill (right-padded to its longest prompt) computes little padding, as lm-eval's hf
    model sorts its batches. A greedy or seeded request's tokens do not depend on the order."""
    order = sorted(requests, key=lambda r: -len(r.prompt))
    bar = tqdm(total=len(requests), desc=desc, unit="request", disable=not progress)
    for _ in engine.run(order):
        bar.update(sum(r.done for r in requests) - bar.n)
    bar.close()
