"""Adaptive micro-batching of concurrent synchronous predictions, and the prediction cache (per web process).

The batcher works group-commit style, with no thread of its own. The first request of a key (a model file and
the probabilities flag) leads. A lone leader, the only request in flight in its process, runs its batch at once.
When other requests are in flight, the leader first lets their threads run: it gives up the GIL once (its own
thread would otherwise keep it through the whole predict call, so that nothing else can arrive), then waits, at
most `max_wait`, while any of them is still on its way (in flight and not yet submitted) and its batch is not
full. Requests submitted while a batch runs gather behind it, and the first of them leads the next batch.
If a merged call raises, every request of that batch is told so (`BatchFailed`) and predicts its row alone,
so one bad row never fails its batch-mates.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import Any

#: Upper bounds of the batch-size histogram buckets (the last one, +Inf, is implied).
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

_WAITING, _LEAD, _DONE, _FAILED = range(4)


class BatchFailed(Exception):
    """The merged call of a batch raised: the caller predicts its own row alone."""


class _Call:
    __slots__ = ("payload", "state", "result", "event")

    def __init__(self, payload: Any):
        self.payload = payload
        self.state = _WAITING
        self.result: Any = None
        self.event: threading.Event | None = None  # only a call that waits needs one

    def outcome(self) -> Any:
        if self.state == _DONE:
            return self.result
        raise BatchFailed(str(self.result)) from (self.result if isinstance(self.result, BaseException) else None)


class BatchSizes:
    """Histogram of the sizes of the batches run (Prometheus buckets: each counts batches of at most its size)."""

    def __init__(self) -> None:
        self.counts = [0] * (len(SIZE_BUCKETS) + 1)
        self.batches = 0
        self.rows = 0
        self.waited = 0  # batches whose leader yielded or waited for other requests in flight

    def observe(self, size: int, waited: bool) -> None:
        i = 0
        while i < len(SIZE_BUCKETS) and size > SIZE_BUCKETS[i]:
            i += 1
        self.counts[i] += 1
        self.batches += 1
        self.rows += size
        self.waited += waited

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, batches of at most that size) for each bucket, +Inf last."""
        out, total = [], 0
        for bound, count in zip([*map(str, SIZE_BUCKETS), "+Inf"], self.counts):
            total += count
            out.append((bound, total))
        return out


class Batcher:
    """Merges concurrent calls with the same key into one call of `run`."""

    def __init__(self, max_size: int, max_wait_ms: float):
        self.max_size = max_size
        self.max_wait = max_wait_ms / 1000
        self.sizes = BatchSizes()
        self._cond = threading.Condition(threading.Lock())
        self._in_flight = 0   # requests between Arrival's enter and exit
        self._arriving = 0    # of those, the ones that have neither submitted nor left
        self._queues: dict[Hashable, deque[_Call]] = {}  # a key is here while a leader serves it

    def arrival(self) -> Arrival:
        """Count a request as in flight (use as a context manager): it submits once, or leaves."""
        return Arrival(self)

    def size_histogram(self) -> tuple[list[tuple[str, int]], int, int]:
        """Cumulative buckets, number of batches and rows in them, read together."""
        with self._cond:
            return self.sizes.cumulative(), self.sizes.batches, self.sizes.rows

    def queued(self) -> int:
        """Calls gathered and not yet running."""
        with self._cond:
            return sum(len(q) for q in self._queues.values())

    def _enter(self) -> None:
        with self._cond:
            self._in_flight += 1
            self._arriving += 1

    def _leave(self) -> None:
        with self._cond:
            self._arriving -= 1
            self._cond.notify_all()

    def _exit(self) -> None:
        with self._cond:
            self._in_flight -= 1

    def _submit(self, key: Hashable, payload: Any, run: Callable[[list[Any]], list[Any]]) -> Any:
        call = _Call(payload)
        with self._cond:
            self._arriving -= 1
            queue = self._queues.get(key)
            lead = queue is None
            if lead:
                queue = self._queues[key] = deque()
            else:
                call.event = threading.Event()
            queue.append(call)
            company = self._in_flight > len(queue)
            self._cond.notify_all()
        if call.event is not None:
            call.event.wait()
            if call.state != _LEAD:
                return call.outcome()
            with self._cond:
                company = self._in_flight > len(queue)
        self._lead(key, call, run, company and self.max_wait > 0)
        return call.outcome()

    def _gather(self, queue: deque[_Call], yielded: bool) -> list[_Call]:
        """Take the next batch from the queue (lock held), waiting while requests are on their way."""
        waited = yielded
        if self._arriving and len(queue) < self.max_size and self.max_wait > 0:
            waited = True
            deadline = time.monotonic() + self.max_wait
            while self._arriving and len(queue) < self.max_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        batch = [queue.popleft() for _ in range(min(len(queue), self.max_size))]
        self.sizes.observe(len(batch), waited)
        return batch

    def _lead(self, key: Hashable, call: _Call, run: Callable[[list[Any]], list[Any]], company: bool) -> None:
        batch: list[_Call] = []
        try:
            if company:
                time.sleep(0)  # give up the GIL once: the threads of the other requests run up to here or beyond
            with self._cond:
                batch = self._gather(self._queues[key], company)
            try:
                results = run([c.payload for c in batch])
                if len(results) != len(batch):
                    raise ValueError(f"{len(results)} results for a batch of {len(batch)}")
            except Exception as e:  # noqa: BLE001 - each caller then predicts alone and gets its own answer
                for c in batch:
                    c.state, c.result = _FAILED, e
            else:
                for c, r in zip(batch, results):
                    c.state, c.result = _DONE, r
        finally:
            with self._cond:
                queue = self._queues[key]
                if call.state in (_WAITING, _LEAD) and call in queue:  # interrupted before its batch was taken
                    queue.remove(call)
                nxt = queue[0] if queue else None
                if nxt is None:
                    del self._queues[key]
                else:
                    nxt.state = _LEAD
            for c in [call, *batch]:
                if c.state in (_WAITING, _LEAD):
                    c.state, c.result = _FAILED, "the batch was interrupted"
                if c is not call and c.event is not None:
                    c.event.set()
            if nxt is not None and nxt.event is not None:
                nxt.event.set()


class Arrival:
    """One request in flight: on its way to the batcher until it submits once, or leaves."""

    __slots__ = ("_batcher", "_open")

    def __init__(self, batcher: Batcher):
        self._batcher = batcher
        self._open = False

    def __enter__(self) -> Arrival:
        self._batcher._enter()
        self._open = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.leave()
        self._batcher._exit()

    def leave(self) -> None:
        """This request will not submit (an error, a cache hit, an array): leaders stop waiting for it."""
        if self._open:
            self._open = False
            self._batcher._leave()

    def submit(self, key: Hashable, payload: Any, run: Callable[[list[Any]], list[Any]]) -> Any:
        """The result `run` gave for this payload, merged with the payloads of concurrent calls of the same key.

        `run` takes a list of payloads and returns one result per payload, in order. Raises BatchFailed when
        the merged call raised.
        """
        if not self._open:
            raise RuntimeError("submit once, before leaving")
        self._open = False
        return self._batcher._submit(key, payload, run)


class PredictionCache:
    """A bounded LRU map from (model key, probabilities flag, row bytes) to an answer, with hit and miss counts."""

    def __init__(self, size: int):
        self.size = size
        self.hits = 0
        self.misses = 0
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
                self._data.move_to_end(key)
            return value

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)
