"""All speed figures in one run: env throughput, ms per update, operator calls per update
(the CPU stand-in for GPU launch overhead, ``kernel_count.py``), end-to-end training, memory.

    python benchmarks/speed_suite.py [--quick] [--compile] [--reference DIR] [--out benchmarks/out/speed]
        [--set KEY=VALUE ...]

Each part runs in its own process (so its peak resident memory is measured alone) on the
current machine: updates on the CPU and, when present, on CUDA; the end-to-end recipe on
the device ``device=auto`` picks, with the ``--set`` overrides (e.g. ``buffer.kind=stratified``
where torchrl's compiled extension is missing). Results go to ``speed.json`` and a markdown table
``speed.md``. Ratios are the headline: this machine's absolute times vary.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RECIPES = HERE.parent / "recipes"


def run_part(command: list[str]) -> tuple[float, float]:
    """Run ``command``; return ``(wall seconds, peak resident MiB of that process)``.

    The peak is the child's own ``ru_maxrss`` (worker processes it spawns are not counted).
    """
    start = time.perf_counter()
    child = subprocess.Popen(command)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise subprocess.CalledProcessError(os.waitstatus_to_exitcode(status), command)
    return wall, usage.ru_maxrss / 1024


def end_to_end(out: Path, algorithm: str, rounds: int, updates: int, extra: list[str]) -> dict:
    """``recipes/<algorithm>_mt10.py`` for ``rounds`` rounds of 200 steps per task and
    ``updates`` updates each (the first round is warm-up), no evaluation; ``extra`` overrides last."""
    overrides = [
        f"collector.total_steps_per_task={200 * rounds}",
        "collector.warmup_rounds=1",
        f"collector.updates_per_round={updates}",
        "eval.episodes_per_task=0",
        "log.progress_bar=false",
        f"log.root={out}",
        f"log.name=end_to_end_{algorithm}",
        *extra,
    ]
    shutil.rmtree(out / f"end_to_end_{algorithm}", ignore_errors=True)
    wall, peak = run_part([sys.executable, str(RECIPES / f"{algorithm}_mt10.py"), *overrides])
    frames = 200 * rounds * 10
    return {"frames": frames, "updates": (rounds - 1) * updates, "seconds": wall, "frames_per_s": frames / wall, "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer frames and repeats (a smoke run)")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "speed")
    parser.add_argument("--compile", action="store_true", help="also time compiled updates")
    parser.add_argument("--reference", default=None, help="checkout of DarkDawn233/D2R_MTRL, timed side by side")
    parser.add_argument("--no-kernel-count", action="store_true",
                        help="leave out the operator count (CPU-only, the same on every machine)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides for the end-to-end recipe runs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env_json = args.out / "env.json"
    frames, repeats, rounds = ("2000", "2", 2) if args.quick else ("10000", "5", 4)
    _, env_peak = run_part([sys.executable, str(HERE / "bench_env.py"), "--frames", frames, "--json", str(env_json)])
    results = {"env": json.loads(env_json.read_text()), "update": {}, "peak_mib": {"env_benchmark": env_peak}}
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        update_json = args.out / f"update_{device}.json"
        extra = (["--compile"] if args.compile else []) + (["--reference", args.reference] if args.reference else [])
        if device == "cuda" and args.compile:
            extra.append("--cudagraphs")
        _, peak = run_part(
            [sys.executable, str(HERE / "bench_update.py"), "--repeats", repeats, "--device", device,
             "--json", str(update_json), *extra]
        )
        update = json.loads(update_json.read_text())
        results["update"][device] = update["ms_per_update"]
        results.setdefault("authors_ms", {})[device] = update["reference_ms"]
        results["peak_mib"][f"update_benchmark_{device}"] = peak
    if not args.no_kernel_count:
        kernels_json = args.out / "kernel_count.json"
        run_part([sys.executable, str(HERE / "kernel_count.py"), "--json", str(kernels_json)]
                 + (["--no-compile"] if args.quick else []))
        results["kernel_count_mt10"] = json.loads(kernels_json.read_text())["MT10"]
    results["end_to_end_mt10"] = {algorithm: end_to_end(args.out, algorithm, rounds, 50, args.overrides) for algorithm in ("d2r", "mt_sac")}
    (args.out / "speed.json").write_text(json.dumps(results, indent=2))
    (args.out / "speed.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = ["| env path | frames/s | x raw |", "|---|---|---|"]
    env = results["env"]
    raw = env["fps"]["raw"]
    lines += [f"| {name} | {fps:.0f} | {fps / raw:.2f} |" for name, fps in env["fps"].items()]
    lines += ["", "| device | size | update | architecture | ms/update | x MT-SAC | authors / ours |", "|---|---|---|---|---|---|---|"]
    for device, variants in results["update"].items():
        authors = results.get("authors_ms", {}).get(device, {})
        for variant, sizes in variants.items():
            for size, times in sizes.items():
                for arch, ms in times.items():
                    speedup = f"{authors[size] / ms:.1f}" if arch == "d2r" and size in authors else ""
                    lines.append(f"| {device} | {size} | {variant} | {arch} | {ms:.1f} | {ms / times['mt_sac']:.2f} | {speedup} |")
        lines += [f"| {device} | {size} | authors' code | d2r | {ms:.1f} | | |" for size, ms in authors.items()]
    kernels = results.get("kernel_count_mt10", {})
    if kernels:
        lines += ["", "| MT10 update, PyTorch path | eager kernels | compiled calls (fused kernels) |", "|---|---|---|"]
    lines += [
        f"| {arch} | {row['eager']['kernels']} | "
        + (f"{row['compiled']['calls']} ({row['compiled']['fused_kernels']})" if "compiled" in row else "-") + " |"
        for arch, row in kernels.items() if arch != "d2r_over_mt_sac"
    ]
    e2e = results["end_to_end_mt10"]
    lines += ["", "| MT10 recipe, end to end | frames | updates | seconds | frames/s | x MT-SAC | peak MiB |"]
    lines += ["|---|---|---|---|---|---|---|"]
    lines += [
        f"| {name} | {r['frames']} | {r['updates']} | {r['seconds']:.0f} | {r['frames_per_s']:.0f} "
        f"| {r['frames_per_s'] / e2e['mt_sac']['frames_per_s']:.2f} | {r['peak_mib']:.0f} |"
        for name, r in e2e.items()
    ]
    lines += [
        "",
        "Peak resident memory per part: "
        + ", ".join(f"{part} {mib:.0f} MiB" for part, mib in results["peak_mib"].items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
