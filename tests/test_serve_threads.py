"""Where the server's work runs: the model worker on its own thread or on the caller's (run_server), and the outbox
that carries the worker's events to the event loop, several per wake-up, in order."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from longllama.serve.app import _Outbox  # noqa: E402
from longllama.serve.worker import ModelWorker  # noqa: E402


def test_a_worker_without_a_thread_runs_its_jobs_on_the_caller_until_closed():
    worker = ModelWorker(4, own_thread=False)
    seen = []
    runner = threading.Thread(target=worker.run)
    runner.start()
    futures = [worker.submit(lambda i=i: seen.append((i, threading.current_thread()))) for i in range(3)]
    for future in futures:
        future.result(timeout=10)
    worker.close()
    runner.join(timeout=10)
    assert not runner.is_alive()
    assert [i for i, _ in seen] == [0, 1, 2] and all(t is runner for _, t in seen)
    worker.close()  # a second close changes nothing (the app's shutdown and run_server both close)


_SIGNALLED_WORKER = """
import signal, threading, time
from longllama.serve.worker import ModelWorker

worker = ModelWorker(4, own_thread=False)
got = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: got.set())  # as run_server's: the handler only flags the stop
threading.Thread(target=lambda: (got.wait(), worker.close()), daemon=True).start()


def signal_me():  # once the main thread waits for jobs, the signal goes to this thread, not to the main one
    time.sleep(1)
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)


threading.Thread(target=signal_me).start()
worker.run()
print("returned")
"""


def test_an_idle_worker_on_the_main_thread_sees_a_signal_another_thread_received():
    """Python runs a signal's handler on the main thread once that thread runs Python again: a worker waiting for
    jobs without end would never see a SIGTERM that the system handed to another of the process's threads."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _SIGNALLED_WORKER], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == "returned", done.stderr[-2000:]


class _Engine:
    """What the worker asks of a BatchGenerator, recording which jobs' sequences each step found queued."""

    max_rows = 4

    def __init__(self):
        self.queued, self.steps = [], []

    @property
    def active(self) -> int:
        return len(self.queued)

    @property
    def full(self) -> bool:
        return self.active >= self.max_rows

    def step(self) -> None:
        self.steps.append(list(self.queued))
        self.queued.clear()


def test_generation_jobs_waiting_together_are_queued_before_one_step():
    """Prompts that wait in the worker's queue join the batch together, up to its room: one step reads them all
    (BatchGenerator.admit reads them in one pass); the rest wait for the next step."""
    engine = _Engine()
    worker = ModelWorker(8, engine, own_thread=False)
    gate = threading.Event()
    worker.submit(lambda: gate.wait(10))  # holds the worker while the generation jobs queue up
    futures = [worker.submit(lambda i=i: engine.queued.append(i), generation=True) for i in range(6)]
    runner = threading.Thread(target=worker.run)
    runner.start()
    gate.set()
    for future in futures:
        future.result(timeout=10)
    worker.close()
    runner.join(timeout=10)
    assert engine.steps[:2] == [[0, 1, 2], [3, 4, 5]]  # the gate's job, then three: a burst is max_rows jobs


@pytest.mark.parametrize("gather, gap, first", [(0.0, 0.1, [0]), (0.5, 0.3, [0, 1, 2, 3]), (0.5, 1.0, [0])])
def test_an_idle_worker_waits_for_generations_that_arrive_together(gather, gap, first):
    """Requests sent together reach the worker a little apart: an idle worker that takes a generation job waits
    `gather` seconds for another, and again after each that comes, then queues them all for one pass (here until
    the batch's 4 rows are there); a request that comes later than that, or any without the wait, is read after."""
    engine = _Engine()
    worker = ModelWorker(8, engine, own_thread=False, gather=gather)
    runner = threading.Thread(target=worker.run)
    runner.start()
    futures = []
    for i in range(4):
        if i:
            time.sleep(gap)
        futures.append(worker.submit(lambda i=i: engine.queued.append(i), generation=True))
    for future in futures:
        future.result(timeout=10)
    worker.close()
    runner.join(timeout=10)
    assert engine.steps[0] == first


def test_a_worker_with_its_own_thread_refuses_run():
    worker = ModelWorker(2)
    try:
        assert worker.submit(threading.current_thread).result(timeout=10) is not threading.current_thread()
        with pytest.raises(RuntimeError, match="own_thread=False"):
            worker.run()
    finally:
        worker.close()


def _outbox_run(produce_on_a_thread: bool) -> tuple[list, list, int]:
    """200 events for two queues through an _Outbox: (what each queue got, the loop's wake-ups)."""

    async def main() -> tuple[list, list, int]:
        outbox = _Outbox(asyncio.get_running_loop())
        wakes = 0
        deliver = outbox._deliver

        def counted() -> None:
            nonlocal wakes
            wakes += 1
            deliver()

        outbox._deliver = counted
        a, b = asyncio.Queue(), asyncio.Queue()

        def produce() -> None:
            for i in range(200):
                outbox.put(a if i % 2 else b, ("text", i))

        if produce_on_a_thread:
            producer = threading.Thread(target=produce)
            producer.start()
            await asyncio.to_thread(producer.join)
        else:  # the loop cannot deliver before this callback returns: every put shares one wake-up
            produce()
        while a.qsize() + b.qsize() < 200:
            await asyncio.sleep(0.01)
        return [a.get_nowait()[1] for _ in range(100)], [b.get_nowait()[1] for _ in range(100)], wakes

    return asyncio.run(main())


def test_the_outbox_delivers_every_event_in_order_sharing_wake_ups():
    got_a, got_b, wakes = _outbox_run(produce_on_a_thread=False)
    assert got_a == list(range(1, 200, 2)) and got_b == list(range(0, 200, 2)) and wakes == 1
    got_a, got_b, wakes = _outbox_run(produce_on_a_thread=True)  # any interleaving: order kept, none lost
    assert got_a == list(range(1, 200, 2)) and got_b == list(range(0, 200, 2)) and 1 <= wakes <= 200


def test_text_pieces_wait_for_a_flush_and_other_events_take_them_along():
    """Pieces put with wake=False stay on the model's side until flush() (the worker calls it while the GPU computes)
    or an event that wakes the loop (a stream's end) takes them along, in order; a flush with nothing waiting, or
    with a wake-up already queued, queues none."""

    async def main() -> None:
        outbox = _Outbox(asyncio.get_running_loop())
        wakes = []
        deliver = outbox._deliver
        outbox._deliver = lambda: (wakes.append(1), deliver())
        events = asyncio.Queue()
        outbox.flush()  # nothing waiting
        outbox.put(events, ("text", "a"), wake=False)
        outbox.put(events, ("text", "b"), wake=False)
        await asyncio.sleep(0.05)
        assert events.empty() and not wakes
        outbox.flush()
        outbox.flush()  # one wake-up is queued already
        await asyncio.sleep(0.05)
        assert [events.get_nowait() for _ in range(2)] == [("text", "a"), ("text", "b")] and len(wakes) == 1
        outbox.put(events, ("text", "c"), wake=False)
        outbox.put(events, ("done", None))
        await asyncio.sleep(0.05)
        assert [events.get_nowait() for _ in range(2)] == [("text", "c"), ("done", None)] and len(wakes) == 2

    asyncio.run(main())


def test_the_worker_calls_on_idle_after_each_job_and_before_it_waits():
    calls = []
    worker = ModelWorker(4, own_thread=False, on_idle=lambda: calls.append("idle"))
    runner = threading.Thread(target=worker.run)
    runner.start()
    worker.submit(lambda: calls.append("job")).result(timeout=10)
    worker.close()
    runner.join(timeout=10)
    # waiting for the first job, the job, then waiting again (the close's None ends the wait)
    assert calls[:3] == ["idle", "job", "idle"]


def test_run_server_on_a_taken_port_raises_naming_it(tmp_path):
    from longllama.cli import SHIPPED_MODEL, LoadOptions, load_model
    from longllama.serve import ServeConfig, create_app, run_server
    from longllama.tokenizer import load_tokenizer

    model = load_model(SHIPPED_MODEL, LoadOptions(device="cpu"))
    app = create_app(model, load_tokenizer(SHIPPED_MODEL), ServeConfig(memory_dir=str(tmp_path)), model_thread=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}"):
            run_server(app, port=port, graceful_seconds=1)
    assert app.state.server.worker._closed


def test_the_server_with_a_gpus_batching_answers_as_alone(tmp_path, monkeypatch):
    """The server's engine with a GPU's defaults (overlapped steps, rows retired in place), here on the CPU:
    concurrent requests of different lengths, one cut by a stop string, answer what each answers alone."""
    import functools

    from fastapi.testclient import TestClient

    from longllama.batch import BatchGenerator
    from longllama.cli import SHIPPED_MODEL, LoadOptions, load_model
    from longllama.serve import ServeConfig, app, create_app
    from longllama.tokenizer import load_tokenizer

    model = load_model(SHIPPED_MODEL, LoadOptions(device="cpu", dtype="float32"))  # fp32: rows agree with alone
    tokenizer = load_tokenizer(SHIPPED_MODEL)
    bodies = [
        {"prompt": f"Story {i}: once upon a time" + " there was" * i, "max_tokens": 8 + 6 * i, "temperature": 0}
        for i in range(4)
    ]

    def answers(concurrent: bool) -> list[dict]:
        config = ServeConfig(memory_dir=str(tmp_path / f"m{concurrent}"), queue=8)
        with TestClient(create_app(model, tokenizer, config)) as client:
            if not concurrent:
                return [client.post("/v1/completions", json=b).json()["choices"][0] for b in bodies]
            got: dict[int, dict] = {}
            threads = [
                threading.Thread(target=lambda i=i: got.setdefault(i, client.post("/v1/completions", json=bodies[i])))
                for i in range(len(bodies))
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            assert client.get("/health").json()["most_decoding"] >= 2  # decoded together
            return [got[i].json()["choices"][0] for i in range(len(bodies))]

    alone = answers(False)
    stop = alone[3]["text"][5:9]  # a stop string inside the longest answer: it ends early, mid-batch
    bodies[3]["stop"] = [stop]
    alone[3] = answers(False)[3]
    assert alone[3]["finish_reason"] == "stop"
    monkeypatch.setattr(app, "BatchGenerator", functools.partial(BatchGenerator, overlap=True, compact_after=4))
    together = answers(True)
    assert [(a["text"], a["finish_reason"]) for a in together] == [(a["text"], a["finish_reason"]) for a in alone]
