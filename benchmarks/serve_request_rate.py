"""Tokens a second of one streamed request to `longllama serve`, for one or more checkouts side by side.

Each --src is a source folder (a checkout's src/, put first on PYTHONPATH of the server process, so two checkouts
compare in one command); for each, and for each --variant (extra arguments of `longllama serve`, e.g.
"--quantize int8"), a server starts on a free loopback port with the shipped model (or --model), answers
--requests streamed completions of --new-tokens tokens one after the other, and stops. Prints one line per server:
tokens a second of each request (from sending it to its last event).

    python benchmarks/serve_request_rate.py --src /tmp/old/src --src src --variant "" --variant "--quantize int8"
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import time

import httpx


def request_rates(src: str, extra: list[str], args) -> list[float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.abspath(src), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "longllama.cli", "serve", "--port", str(port), *extra]
    if args.model:
        command += ["--model", args.model]
    server = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if server.poll() is not None:
                    raise RuntimeError(f"the server ended with status {server.returncode}: {command}") from None
                time.sleep(0.3)
        body = {"prompt": args.prompt, "max_tokens": args.new_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True}  # fmt: skip
        rates = []
        with httpx.Client(timeout=600) as client:
            for _ in range(args.requests):
                start = time.perf_counter()
                with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                    response.raise_for_status()
                    for _line in response.iter_lines():
                        pass
                rates.append(round(args.new_tokens / (time.perf_counter() - start), 1))
        return rates
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", action="append", required=True, help="a checkout's source folder (repeatable)")
    ap.add_argument("--variant", action="append", default=None, help="extra `longllama serve` arguments (repeatable)")
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the shipped model)")
    ap.add_argument("--prompt", default="def fibonacci(n):")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=4)
    args = ap.parse_args()
    for variant in args.variant or [""]:
        for src in args.src:
            rates = request_rates(src, shlex.split(variant), args)
            print(f"{src} {variant or '(defaults)'}: tokens/s per request {rates}", flush=True)


if __name__ == "__main__":
    main()
