"""Where the server's work runs: the model worker on its own thread or on the caller's (run_server), and the outbox
that carries the worker's events to the event loop, several per wake-up, in order."""

from __future__ import annotations

import asyncio
import socket
import threading

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
