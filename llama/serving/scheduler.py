"""The engine in one background thread, and the bridge between it and the asyncio world of the HTTP server.

HTTP handlers ``submit`` requests and ``cancel`` them; both become commands that the engine thread applies
before its next step, so a new request joins the running batch at the next step and a cancelled one frees its
slot before the next decode. After each step the thread publishes every request's progress (tokens so far, and
the finish reason once done) to the handler's asyncio queue.

Under tensor parallelism every rank steps its own engine over its share of the model: rank 0 (the HTTP server)
broadcasts each step's commands with ``torch.distributed.broadcast_object_list``, and the other ranks ``follow``
them, so all ranks run identical steps (an empty broadcast each second keeps idle ranks within the process
group's timeout).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llama.generation.engine import Engine, Request
from llama.generation.sampling import SamplingParams

log = logging.getLogger("llama.serving")

HEARTBEAT_S = 1.0  # an idle rank 0 broadcasts this often under tensor parallelism


class QueueFull(Exception):
    """More requests than free slots plus ``max_queue`` places."""


@dataclass(eq=False)
class Handle:
    """One engine request as its HTTP handler sees it. Progress arrives on ``updates`` as (index, tokens so far,
    finish reason or None); the engine only appends to the request's lists, so their first ``tokens so far``
    entries are settled."""

    request: Request
    index: int  # the choice this request answers
    updates: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    id: int = 0
    published: int = -1  # tokens last published
    counted: bool = True  # counts against the queue's capacity (a readiness probe does not)


class Scheduler:
    def __init__(self, engine: Engine, max_queue: int, metrics=None, warmup_prompt: list[int] | None = None,
                 threads: int | None = None):
        """``max_queue``: requests that may wait for a slot. ``warmup_prompt``: generated from once (and once per
        batch bucket with a compiled engine) before requests are served, so compilation happens before the server
        says it is ready. ``threads``: the engine thread's intra-op threads (default: the constructing thread's)."""
        self.engine = engine
        self.threads = threads or torch.get_num_threads()
        self.capacity = engine.max_batch_size + max_queue
        self.metrics = metrics
        self.warmup_prompt = warmup_prompt
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.lock = threading.Condition()
        self.commands: list[tuple] = []  # applied by the engine thread before its next step
        self.live: dict[int, Handle] = {}  # submitted and not yet published as done (engine thread only)
        self.outstanding = 0  # counted requests submitted and not done
        self.ids = itertools.count(1)
        self.warm = threading.Event()
        self.thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------- the asyncio side

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Finish the engine thread (and, under tensor parallelism, every rank's loop and the process group)."""
        self._command(("stop",))
        if self.thread is not None:
            self.thread.join()
        if self.distributed:
            _leave_process_group()

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def submit(self, requests: list[Request], updates: asyncio.Queue, counted: bool = True) -> list[Handle]:
        """Queue ``requests`` (one HTTP request's choices, all or none); raises QueueFull when there is no room."""
        loop = asyncio.get_running_loop()
        handles = [Handle(r, i, updates, loop, next(self.ids), counted=counted) for i, r in enumerate(requests)]
        with self.lock:
            if counted and self.outstanding + len(requests) > self.capacity:
                raise QueueFull(f"the server is busy: {self.outstanding} requests are running or waiting")
            self.outstanding += len(requests) * counted
            self.commands += [("submit", h) for h in handles]
            self.lock.notify()
        return handles

    def cancel(self, handles: list[Handle]) -> None:
        """Stop working on ``handles`` (done ones are left alone)."""
        self._command(*[("cancel", h.id) for h in handles])

    async def probe(self, prompt: list[int], deadline_s: float) -> bool:
        """Whether a one-token generation through the engine finishes within ``deadline_s``."""
        if not (self.warm.is_set() and self.alive):
            return False
        updates: asyncio.Queue = asyncio.Queue()
        request = Request(list(prompt), SamplingParams(temperature=0, top_p=1, max_tokens=1))
        handles = self.submit([request], updates, counted=False)

        async def finish_reason() -> str:
            while (reason := (await updates.get())[2]) is None:
                pass
            return reason

        try:
            return await asyncio.wait_for(finish_reason(), deadline_s) in ("stop", "length")
        except asyncio.TimeoutError:
            return False
        finally:
            self.cancel(handles)

    def _command(self, *commands: tuple) -> None:
        with self.lock:
            self.commands += commands
            self.lock.notify()

    # ------------------------------------------------------------------------------------- the engine thread

    def _run(self) -> None:
        torch.set_num_threads(self.threads)  # a thread's own setting: a new thread starts from the default
        self._warm_up()
        while True:
            commands = self._take_commands()
            if self.distributed:
                box = [[c if c[0] != "submit" else ("submit", c[1].id, c[1].request) for c in commands]]
                dist.broadcast_object_list(box, src=0)
            if not self._apply(commands):
                return
            self._step()

    def follow(self) -> None:
        """The loop of a rank other than 0 under tensor parallelism: apply rank 0's commands, step alike."""
        self._warm_up()
        torch.set_num_threads(self.threads)
        requests: dict[int, Request] = {}
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            for command in box[0]:
                if command[0] == "stop":
                    return _leave_process_group()
                if command[0] == "submit":
                    _, id, request = command
                    requests[id] = request
                    self.engine.submit(request)
                elif (request := requests.get(command[1])) is not None:
                    self.engine.cancel(request)
            for id in [id for id, r in requests.items() if r.done]:
                del requests[id]
            if self.engine.busy:
                self.engine.step()

    def _warm_up(self) -> None:
        if self.warmup_prompt is not None:
            sizes = self.engine.buckets if self.engine.compiled else [1]
            for size in sizes:  # a compiled engine builds its graph for each bucket here
                requests = [Request(list(self.warmup_prompt), SamplingParams(temperature=0, max_tokens=2))
                            for _ in range(size)]
                for _ in self.engine.run(requests):
                    pass
        self.warm.set()

    def _take_commands(self) -> list[tuple]:
        with self.lock:
            if not self.commands and not self.engine.busy:  # idle: wait for work
                self.lock.wait(HEARTBEAT_S if self.distributed else None)
            commands, self.commands = self.commands, []
        return commands

    def _apply(self, commands: list[tuple]) -> bool:
        """Apply commands in order; False on "stop"."""
        for command in commands:
            if command[0] == "stop":
                for handle in self.live.values():
                    self.engine.cancel(handle.request)
                self._publish()
                return False
            if command[0] == "submit":
                handle = command[1]
                self.live[handle.id] = handle
                try:
                    self.engine.submit(handle.request)  # checked by the handler already
                except ValueError:
                    log.exception("a request the handler passed was refused by the engine")
                    handle.request.finish_reason = "error"
            elif (handle := self.live.get(command[1])) is not None:
                self.engine.cancel(handle.request)
        self._publish()
        return True

    def _step(self) -> None:
        if not self.engine.busy:
            return
        try:
            self.engine.step()
        except Exception:  # an internal fault: fail the running requests, keep serving
            log.exception("engine step failed; cancelling the running requests")
            for handle in self.live.values():
                self.engine.cancel(handle.request)
                handle.request.finish_reason = "error"
        self._publish()

    def _publish(self) -> None:
        """Tell each handler what its request made since the last step."""
        for id, handle in list(self.live.items()):
            request = handle.request
            n = len(request.tokens)
            if n == handle.published and not request.done:
                continue
            handle.published = n
            handle.loop.call_soon_threadsafe(handle.updates.put_nowait, (handle.index, n, request.finish_reason))
            if request.done:
                del self.live[id]
                with self.lock:
                    self.outstanding -= handle.counted
        if self.metrics is not None:
            slots = self.engine.slots
            self.metrics.queue_depth.set(len(self.engine.waiting))
            self.metrics.active_slots.set(sum(slot.request is not None for slot in slots))


def _leave_process_group() -> None:
    dist.barrier()  # every rank has left its loop (a barrier first avoids an abort at exit)
    dist.destroy_process_group()
