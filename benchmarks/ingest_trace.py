"""Where the time of one long ingest goes, group by group (3B shape, bf16, one GPU): CUDA events around every window
group's pass (layer 0's call) and around the memory layers' attention modules (their q/k/v/o products included)
give each group's time and its memory attention's share, against the memory keys the group reads; nvidia-smi,
sampled in the background, gives the SM clock, power and temperature over the run (does a long run slow down on
its own?). Execution choices are changed with `--plan KEY=VALUE` (ExecutionPlan fields, repeatable).

    PYTHONPATH=src python benchmarks/ingest_trace.py --tokens 1048576 [--plan split_groups=false]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time

import torch
from bench_inference import _longllama, plan_record

from longllama.plan import check_changes, parse_overrides

_FIELDS = "clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"


def _sampler(path: str) -> subprocess.Popen | None:
    try:
        return subprocess.Popen(
            ["nvidia-smi", f"--query-gpu={_FIELDS}", "--format=csv,noheader,nounits", "-lms", "250", "-f", path]
        )
    except OSError as exc:
        print(f"nvidia-smi not started ({exc}): no clock samples")
        return None


def _samples(path: str) -> list[tuple[float, float, float, str]]:
    rows = []
    with open(path) as f:
        for line in f:
            parts = [p.strip() for p in line.split(",")]
            try:
                rows.append((float(parts[0]), float(parts[1]), float(parts[2]), parts[3]))
            except (ValueError, IndexError):
                continue
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1048576)
    ap.add_argument("--rows", type=int, default=16, help="lines of the per-group table")
    ap.add_argument(
        "--plan",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an execution-plan field (repeatable), e.g. split_groups=false, key_parts=3",
    )
    args = ap.parse_args()
    changes = parse_overrides(args.plan)
    check_changes(changes)  # a bad field or value: an error before the model is built
    torch.manual_seed(0)
    model = _longllama("3b", "cuda")
    model.set_plan(**changes)
    config = model.config
    layers = model.model.layers
    print(torch.cuda.get_device_name(), torch.__version__, plan_record(model))
    window = config.context_window
    warm = (2 * (model.plan.window_group_tokens // window) + 1) * window
    with torch.no_grad():  # compilation and kernel loading: two window groups (one with a memory-less window) + one
        model(torch.randint(3, config.vocab_size, (1, warm), device="cuda"), use_cache=False, logits_to_keep=1)
    torch.cuda.synchronize()

    starts: list[torch.cuda.Event] = []
    attn: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def event() -> torch.cuda.Event:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    tokens: list[int] = []  # per group pass: tokens through layer 0 (windows x window length)

    def group_start(module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        tokens.append(x.shape[0] * x.shape[1])
        starts.append(event())

    hooks = [layers[0].register_forward_pre_hook(group_start, with_kwargs=True)]
    for i in config.mem_layers:
        hooks.append(layers[i].self_attn.register_forward_pre_hook(lambda *_: attn.append((event(), None))))
        hooks.append(layers[i].self_attn.register_forward_hook(lambda *_: attn.__setitem__(-1, (attn[-1][0], event()))))
    ids = torch.randint(3, config.vocab_size, (1, args.tokens), device="cuda")
    log = tempfile.NamedTemporaryFile(suffix=".csv", delete=False).name
    sampler = _sampler(log)
    time.sleep(1.0)
    t0 = time.perf_counter()
    with torch.no_grad():
        model(ids, use_cache=False, logits_to_keep=1)
    end = event()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    time.sleep(0.5)
    if sampler is not None:
        sampler.terminate()
        sampler.wait()
    for h in hooks:
        h.remove()

    n_mem = len(config.mem_layers)
    groups = len(starts)
    group_ms = [starts[g].elapsed_time(starts[g + 1] if g + 1 < groups else end) for g in range(groups)]
    attn_ms = [sum(a.elapsed_time(b) for a, b in attn[g * n_mem : (g + 1) * n_mem]) for g in range(groups)]
    before = [sum(tokens[:g]) for g in range(groups)]  # memory keys written before each pass
    print(
        f"ingest {args.tokens}: wall {wall:.3f} s, {groups} group passes, GPU time of the passes "
        f"{sum(group_ms) / 1e3:.3f} s, memory layers' attention {sum(attn_ms) / 1e3:.3f} s, the rest "
        f"{(sum(group_ms) - sum(attn_ms)) / 1e3:.3f} s"
    )
    failed = model.plan.failures.names()
    if failed:  # the run then timed the fallback, not the plan's path
        print(f"failed during the run, served by their fallbacks: {', '.join(failed)}")
    print(
        f"{'pass':>6} {'tokens':>7} {'keys before':>12} {'pass ms':>9} {'mem-layer attn ms':>18} {'rest ms':>8} "
        f"{'attn us/1k keys/layer':>22}"
    )
    step = max(1, groups // args.rows)
    for g in list(range(0, groups, step)) + [g for g in range(max(groups - 3, 0), groups) if g % step]:  # + the end
        per_key = attn_ms[g] / n_mem / max(before[g], 1) * 1e6
        print(
            f"{g:6d} {tokens[g]:7d} {before[g]:12d} {group_ms[g]:9.2f} {attn_ms[g]:18.2f} "
            f"{group_ms[g] - attn_ms[g]:8.2f} {per_key:22.2f}"
        )
    full = max(tokens)
    rest = [group_ms[g] - attn_ms[g] for g in range(groups) if tokens[g] == full]
    q = max(1, len(rest) // 4)
    print(
        f"rest (outside the memory layers' attention) ms per pass of {full} tokens, by quarter of the run: "
        + ", ".join(f"{sum(rest[i : i + q]) / len(rest[i : i + q]):.2f}" for i in range(0, len(rest), q))
    )
    samples = _samples(log) if sampler is not None else []
    if samples:
        k = max(1, len(samples) // 8)
        print(f"nvidia-smi, {len(samples)} samples over the run (SM MHz / W / C / throttle reasons), by eighths:")
        for i in range(0, len(samples), k):
            part = samples[i : i + k]
            reasons = sorted({s[3] for s in part})
            print(
                f"  {sum(s[0] for s in part) / len(part):7.0f} MHz {sum(s[1] for s in part) / len(part):6.0f} W "
                f"{max(s[2] for s in part):4.0f} C  reasons {','.join(reasons)}"
            )


if __name__ == "__main__":
    main()
