"""What a process spent before it could run at full speed: weights loaded, graphs compiled, kernels compiled or
configured, kernels autotuned, each with its seconds and where it came from (a cache on disk, a table, a rule).

One process-wide, append-only log: the library records into it (`record`, `timed`), users and benchmarks only read
it (`events()` returns copies; `since(mark)` the events after a `mark()`). `longllama generate --verbose` prints it
(`report`), benchmarks/bench_inference.py and benchmarks/cold_start.py put it in their records.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

KINDS = ("setup", "load", "compile", "tune", "config", "capture", "token")


@dataclass(frozen=True)
class Event:
    """One thing done once per process. kind: "setup" (what comes before the weights: the interpreter and the
    libraries, the tokenizer and the prompt, the GPU's start-up), "load" (weights), "compile" (a torch.compile
    graph, a Triton kernel, a FlashAttention 4 kernel: built, or read from a cache on disk), "tune" (a kernel
    autotuned), "config" (a kernel's configuration taken from a table or the rule, no timing runs), "capture" (a
    CUDA graph), "token" (the process's first generated token reached the host: seconds 0, `at` says when).
    source: where it came from ("cache", "built", "tuned table", "shipped table", "rule", ...).
    at: when it ended, in seconds since the process started (Linux; elsewhere since this module was imported)."""

    kind: str
    name: str
    seconds: float
    source: str = ""
    at: float = 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["seconds"] = round(self.seconds, 4)
        out["at"] = round(self.at, 3)
        return out


def _process_age() -> float:
    """Seconds since this process started (/proc on Linux), 0 where that cannot be read."""
    try:
        with open("/proc/self/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


_START = time.perf_counter() - _process_age()
_LOCK = threading.Lock()
_EVENTS: list[Event] = []
# A long-running process (a server recaptures a graph at every flush) keeps its first events, then stops logging.
_MAX_EVENTS = 100_000


def record(kind: str, name: str, seconds: float, source: str = "") -> None:
    """Append an event (library code only)."""
    if kind not in KINDS:
        raise ValueError(f"event kind {kind!r}: use one of {', '.join(KINDS)}")
    with _LOCK:
        if len(_EVENTS) < _MAX_EVENTS:
            _EVENTS.append(Event(kind, name, float(seconds), source, since_start()))


def since_start() -> float:
    """Seconds since the process started (Linux; elsewhere since this module was imported)."""
    return time.perf_counter() - _START


def record_once(kind: str, name: str, seconds: float = 0.0, source: str = "") -> bool:
    """Record an event unless one of this kind and name exists; returns whether it recorded."""
    with _LOCK:
        if any(e.kind == kind and e.name == name for e in _EVENTS):
            return False
    record(kind, name, seconds, source)
    return True


def seen(kind: str, name: str) -> bool:
    """Whether an event of this kind and name was recorded."""
    with _LOCK:
        return any(e.kind == kind and e.name == name for e in _EVENTS)


@contextlib.contextmanager
def timed(kind: str, name: str, source: str = "") -> Iterator[dict]:
    """Record the seconds of the `with` body; the body may set `info["source"]` once it knows it, and
    `info["seconds"]` holds them after it."""
    info = {"source": source}
    start = time.perf_counter()
    try:
        yield info
    finally:
        info["seconds"] = time.perf_counter() - start
        record(kind, name, info["seconds"], info["source"])


def events() -> tuple[Event, ...]:
    """Every event so far, oldest first."""
    with _LOCK:
        return tuple(_EVENTS)


def mark() -> int:
    """A position in the log, for `since`."""
    with _LOCK:
        return len(_EVENTS)


def since(position: int) -> tuple[Event, ...]:
    """The events recorded after `mark()` returned `position`."""
    with _LOCK:
        return tuple(_EVENTS[position:])


def summary(selected: tuple[Event, ...] | None = None) -> dict[str, dict[str, float]]:
    """Per kind: how many events and their total seconds (benchmark records)."""
    out: dict[str, dict[str, float]] = {}
    for event in events() if selected is None else selected:
        entry = out.setdefault(event.kind, {"count": 0, "seconds": 0.0})
        entry["count"] += 1
        entry["seconds"] = round(entry["seconds"] + event.seconds, 4)
    return out


def report(selected: tuple[Event, ...] | None = None) -> str:
    """The events as lines `at  kind  seconds  name  [source]` (at: seconds since the process started, when the event
    ended), then a total per kind."""
    chosen = events() if selected is None else selected
    lines = [
        f"{e.at:9.3f}  {e.kind:<8}{e.seconds:9.3f} s  {e.name}" + (f"  [{e.source}]" if e.source else "")
        for e in chosen
    ]
    lines += [f"total {kind}: {v['count']} in {v['seconds']:.3f} s" for kind, v in summary(chosen).items()]
    return "\n".join(lines)


FIRST_TOKEN = "first new token"
SECOND_TOKEN = "second new token"  # the first that the decoder computed: its kernels compiled, its graph captured


class FirstToken:
    """A generation streamer's wrapper that records when the process's first and second new tokens reach the host."""

    def __init__(self, streamer) -> None:
        self.streamer = streamer
        self.count = 0

    def put(self, value) -> None:
        if self.count < 2:
            record_once("token", (FIRST_TOKEN, SECOND_TOKEN)[self.count])
            self.count += 1
        self.streamer.put(value)

    def end(self) -> None:
        self.streamer.end()
