"""Importance-matrix cost on Llama-3.1-8B shapes: llama-imatrix over the release's calibration text,
and llama-quantize with and without the matrix, measured at N and 2N layers and extrapolated to 32.

    .venv/bin/python benchmarks/imatrix.py [--layers 2] [--chunks 4] [--work DIR]

Each step runs once (the 32-layer figures are the point, and they take minutes).

Builds (once, as benchmarks/merge.py does) BF16 models with Llama-3.1-8B layer shapes and N and 2N
layers, converts each to an F16 GGUF (release/gguf.py), then runs what the gguf stage runs with
specs/qalb.toml's settings: ``llama-imatrix`` over ``calibration/ur-en.txt`` in chunks of 512
tokens (``--chunks`` of them; the cost per chunk scales to the whole text), and Q4_K_M, Q3_K_M and IQ4_XS
with llama-cpp-python's quantizer (no matrix) and with
``llama-quantize --imatrix``. Every cost is linear in the layer count (the embeddings and the
output layer are the fixed part), so the two sizes give the 32-layer figure. The tools use every
core; the figures are CPU seconds (user + system of the child processes), which other load on
the machine disturbs far less than wall time, and wall time on a machine of N free cores is
about CPU / N.
"""

from __future__ import annotations

import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # not this folder: its gguf.py would stand in for the gguf package

TYPES = ("Q4_K_M", "Q3_K_M", "IQ4_XS")
LAYERS_8B = 32


def cpu_seconds() -> float:
    """User + system CPU seconds of this process's finished children."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def imatrix_run(spec, f16: Path, out: Path, chunks: int) -> float:
    """CPU seconds of llama-imatrix run as the gguf stage runs it, over ``chunks`` chunks."""
    import os

    from release import llamatools

    im = spec.gguf_imatrix()
    cmd = [str(llamatools.tool("llama-imatrix")), "-m", str(f16), "-f", im.calibration, "-o", str(out),
           "-c", str(im.chunk_tokens), "-b", str(im.chunk_tokens), "--chunks", str(chunks),
           "--no-ppl", "--no-repack", "-t", str(len(os.sched_getaffinity(0)))]
    cpu = cpu_seconds()
    run = subprocess.run(cmd, cwd=spec.path.parent, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(run.stderr[-3000:])
    assert re.search(rf"computing over {chunks} chunks", run.stdout + run.stderr)
    return cpu_seconds() - cpu


def measure(spec, work: Path, layers: int, chunks: int) -> dict[str, float]:
    """Seconds of each step on the ``layers``-layer model."""
    from release import gguf, scaffold

    base = work / f"base-8b-{layers}l"
    if not (base / "config.json").is_file():
        print(f"building the {layers}-layer 8B-shaped model in {base} ...", flush=True)
        scaffold.write_model(base, scaffold.eight_b_shaped(layers), spec.chat, max_shard_bytes=5_000_000_000)
    f16 = work / f"f16-{layers}l.gguf"
    if not f16.is_file():
        print(f"converting the {layers}-layer model to F16 GGUF ...", flush=True)
        gguf.convert(base, f16, spec, "F16", progress=False)
    out = work / f"imatrix-{layers}l"
    out.mkdir(exist_ok=True)
    matrix = out / spec.imatrix_file_name()
    print(f"{layers} layers: llama-imatrix, {chunks} chunks ...", flush=True)
    t = time.perf_counter()
    times = {"imatrix": imatrix_run(spec, f16, matrix, chunks)}
    print(f"  {times['imatrix']:.0f} CPU s, {time.perf_counter() - t:.0f} s wall", flush=True)
    for q in TYPES:
        for label, m in (("plain", None), ("imatrix", matrix)):
            print(f"{layers} layers: {q} {label} ...", flush=True)
            t, cpu = time.perf_counter(), cpu_seconds()
            gguf.quantize(f16, out / f"{q}-{label}.gguf", q, imatrix=m)
            times[f"{q} {label}"] = cpu_seconds() - cpu
            print(f"  {times[f'{q} {label}']:.0f} CPU s, {time.perf_counter() - t:.0f} s wall", flush=True)
            (out / f"{q}-{label}.gguf").unlink()
    matrix.unlink()
    return times


def main() -> None:
    import argparse

    from release import spec as specmod
    from release import verify

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the smaller 8B-shaped model")
    p.add_argument("--chunks", type=int, default=4, help="chunks of the calibration text llama-imatrix runs")
    p.add_argument("--work", default=str(ROOT / "build" / "bench"), help="where inputs are built (once) and outputs go")
    args = p.parse_args()
    work, chunks = Path(args.work), args.chunks
    work.mkdir(parents=True, exist_ok=True)
    spec = specmod.load(ROOT / "specs" / "qalb.toml")
    im = spec.gguf_imatrix()
    small, big = args.layers, 2 * args.layers
    results = {n: measure(spec, work, n, chunks) for n in (small, big)}
    vocab = verify.load_gguf(work / f"f16-{small}l.gguf", vocab_only=True)
    text = spec.resolve(im.calibration).read_bytes()
    total_chunks = len(vocab.tokenize(text, add_bos=True)) // im.chunk_tokens

    def at_32(step: str) -> float:
        a, b = results[small][step], results[big][step]
        return a + (b - a) / (big - small) * (LAYERS_8B - small)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Importance matrix on Llama-3.1-8B shapes: CPU seconds ({im.calibration}: "
                        f"{total_chunks} chunks of {im.chunk_tokens} tokens)")
    for col in ("step", f"{small} layers", f"{big} layers", f"{LAYERS_8B} layers (extrapolated)",
                f"{LAYERS_8B} layers, wall on 2 cores"):
        table.add_column(col, justify="right")

    def row(name: str, scale: float, step: str) -> None:
        full = scale * at_32(step)
        table.add_row(name, *(f"{scale * results[n][step]:.0f}" for n in (small, big)), f"{full:.0f}",
                      f"{full / 2 / 60:.0f} min")

    row(f"llama-imatrix, the whole text (measured on {chunks} chunks)", total_chunks / chunks, "imatrix")
    for q in TYPES:
        row(f"{q}, llama-cpp-python (no matrix)", 1, f"{q} plain")
        row(f"{q}, llama-quantize --imatrix", 1, f"{q} imatrix")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
