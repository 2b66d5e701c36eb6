"""Bounded read-ahead: compute the next blocks in a worker thread while the caller writes."""

from __future__ import annotations

import collections
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetch(items: Iterable[T], fn: Callable[[T], R], depth: int = 2, workers: int = 1) -> Iterator[tuple[T, R]]:
    """Yield (item, fn(item)) in order with at most `depth` results computed ahead, on
    `workers` threads.

    Memory is bounded by `depth` + 1 results; numpy and file reads release the GIL, so reading
    and decoding overlap with the caller's writes (and with each other when workers > 1).
    """
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gptoss-read") as pool:
        queue: collections.deque = collections.deque()
        it = iter(items)
        for item in it:
            queue.append((item, pool.submit(fn, item)))
            if len(queue) > depth:
                break
        while queue:
            item, fut = queue.popleft()
            result = fut.result()
            nxt = next(it, None)
            if nxt is not None:
                queue.append((nxt, pool.submit(fn, nxt)))
            yield item, result
            del result


def background(fn: Callable[..., R], *args, **kwargs) -> Future:
    """Run fn(*args, **kwargs) on a daemon thread now; `.result()` joins it. A daemon, so a
    command that fails meanwhile exits at once instead of waiting for it."""
    future: Future = Future()

    def run():
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to whoever calls .result()
            future.set_exception(e)

    threading.Thread(target=run, name="gptoss-bg", daemon=True).start()
    return future
