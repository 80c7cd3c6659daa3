"""llama.cpp's graph computations, all on one thread of the process.

llama.cpp's CPU backend runs each `llama_decode` as an OpenMP parallel region, and libgomp keeps a
pool of worker threads per thread that ever started one. Once there are more pooled threads than
CPUs (two Python threads that each decoded once, on two cores), libgomp stops spinning between
regions and puts its workers to sleep after about 100 spins: every layer then waits for a wake-up,
and decoding slows down (the README's Speed section has the figure). A chat app decodes from
whichever worker thread is free (Textual's thread workers, the server's request threads, the
model-loading thread), so every decode is handed to this one long-lived thread instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_executor: ThreadPoolExecutor | None = None
_start_lock = threading.Lock()
_here = threading.local()


def _mark() -> None:
    _here.compute = True


def _get_executor() -> ThreadPoolExecutor:
    global _executor
    with _start_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="starling-compute", initializer=_mark
            )
        return _executor


def on_compute_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`fn(*args, **kwargs)` run on the compute thread (directly, if this is it). The caller
    waits; if its wait is interrupted (Ctrl+C), the call still finishes before the interruption
    goes on, so llama.cpp is never left computing on a context its caller may free."""
    if getattr(_here, "compute", False):
        return fn(*args, **kwargs)
    future: Future[T] = _get_executor().submit(fn, *args, **kwargs)
    try:
        return future.result()
    except BaseException:
        if not future.done():
            wait([future])
        raise
