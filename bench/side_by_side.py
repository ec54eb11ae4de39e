"""Run each system of a side-by-side benchmark in a process of its own (bench_train.py, bench_model.py)."""
import json
import subprocess
import sys


def run_each(script: str, systems: tuple[str, ...], flags: list[str]) -> dict[str, dict]:
    """{system: result} of `python script --system S *flags` for each system, one fresh process each, so neither
    sees the other's imports, compiled kernels or allocator state (peak memory stays clean). Each prints its
    result as JSON on its last stdout line; a failing one ends the benchmark with the tail of its stderr."""
    results = {}
    for system in systems:
        out = subprocess.run([sys.executable, script, "--system", system, *flags], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{system} failed:\n{out.stderr[-3000:]}")
        results[system] = json.loads(out.stdout.strip().splitlines()[-1])
    return results
