"""Serving: an OpenAI-compatible HTTP server (``app``) over the generation engine, stepped in a background thread
with continuous batching (``scheduler``), with Prometheus metrics (``metrics``) and the request schemas and error
body (``protocol``). Start it with ``python -m llama.serve``."""

from llama.serving.app import create_app
from llama.serving.scheduler import Scheduler

__all__ = ["Scheduler", "create_app"]
