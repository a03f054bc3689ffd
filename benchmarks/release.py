"""The whole post-training release at Llama 3.1 8B layer shapes, stage by stage.

    .venv/bin/python benchmarks/release.py --layers 8 [--work build/bench] [--keep] [--from STAGE]

Builds (once) an 8B-shaped BF16 base with N layers and two adapters shaped like Qalb's own (CPT:
r=128, alpha=32, the seven projections, embed_tokens and lm_head in full, as Unsloth saves them;
SFT: r=128, alpha=32, the seven projections), then runs the release of ``specs/qalb.toml`` with
only the base and the adapters swapped in: merge (BF16 + FP16), bnb4, gguf (F16 and the spec's
quant types), modelfiles, verify, cards, and the Hub step with ``--push`` to a local Hub
(release/localhub.py, which checks every pushed byte's sha256 but, unless ``--hub-copy``, keeps
no second copy on the disk). Each stage runs as ``invoke release --only STAGE`` in its own process, so
its memory is its own. Per stage it prints: wall seconds; peak anonymous memory (RssAnon, sampled
every 0.1 s over the process tree) beside VmHWM, and the file-backed pages mapped (RssFile:
llama.cpp and safetensors map their files; the kernel reclaims those pages, so they are reported,
not counted); bytes read and written; disk free before and after; and for the stages that only
move bytes (merge, the GGUF F16 conversion, the Hub's staging and hashing) the ratio of their
time to the I/O floor, their bytes over the disk's sequential bandwidth measured in the same run.
Ends with the extrapolation to 32 layers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# not this folder on the path: its gguf.py would shadow the gguf package that spec checks import
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

STAGES = ("merge", "bnb4", "gguf", "modelfiles", "verify", "cards", "publish")
IO_ONLY = ("merge", "publish")  # the GGUF F16 conversion is timed from the gguf manifest
TOKEN = "hf_bench_local"


@dataclass
class Row:
    stage: str
    seconds: float = 0.0
    anon_gb: float = 0.0
    hwm_gb: float = 0.0
    file_gb: float = 0.0
    read_gb: float = 0.0
    written_gb: float = 0.0
    free_before_gb: float = 0.0
    free_after_gb: float = 0.0
    floor_s: float | None = None
    extra: dict = field(default_factory=dict)


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in open(f"/proc/{pid}/status", encoding="ascii"):
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _io(pid: int) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split(": ") for line in open(f"/proc/{pid}/io", encoding="ascii"))}
    except OSError:
        return {}


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in open(f"/proc/{p}/task/{task}/children", encoding="ascii").read().split()]
        except OSError:
            pass
    return out


def measure(cmd: list[str], env: dict, cwd: Path) -> Row:
    """Run ``cmd``; sample memory and I/O of its process tree every 0.1 s."""
    row = Row("")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    io_last: dict[int, dict[str, int]] = {}
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        pids = _tree(proc.pid)
        stats = {p: _status(p) for p in pids}
        row.anon_gb = max(row.anon_gb, sum(s.get("RssAnon", 0) for s in stats.values()) / 1e9)
        row.file_gb = max(row.file_gb, sum(s.get("RssFile", 0) for s in stats.values()) / 1e9)
        row.hwm_gb = max(row.hwm_gb, max((s.get("VmHWM", 0) for s in stats.values()), default=0) / 1e9)
        for p in pids:
            io = _io(p)
            if io:
                io_last[p] = io
        time.sleep(0.1)
    reader.join()
    row.seconds = time.perf_counter() - start
    row.read_gb = sum(v.get("read_bytes", 0) for v in io_last.values()) / 1e9
    row.written_gb = sum(v.get("write_bytes", 0) for v in io_last.values()) / 1e9
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n" + "".join(output)[-4000:])
    row.extra["output"] = "".join(output)
    return row


def disk_bandwidth(folder: Path, size: int = 2 << 30) -> tuple[float, float]:
    """Sequential write (fsync) and read (after evicting the file from the page cache) in bytes/s."""
    path = folder / ".bandwidth-probe"
    block = os.urandom(1 << 24)
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    write = size / (time.perf_counter() - start)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    start = time.perf_counter()
    while os.read(fd, 1 << 24):
        pass
    read = size / (time.perf_counter() - start)
    os.close(fd)
    path.unlink()
    return write, read


def write_spec(work: Path, base: Path, build: Path) -> Path:
    """specs/qalb.toml with only the base swapped (a local path) and the build folder and Hub
    endpoint pointed at the benchmark's; the files it refers to are copied beside it."""
    folder = work / "spec"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(ROOT / "specs", folder, ignore=shutil.ignore_patterns("demo", "demo.toml"))
    text = (folder / "qalb.toml").read_text(encoding="utf-8")
    text = text.replace("[base]\n", f'[base]\npath = "{base}"\n', 1)
    text = re.sub(r'(?m)^(\[build\]\n)dir = .*$', rf'\1dir = "{build}"', text)
    text = re.sub(r'(?m)^(\[hub\]\n)endpoint = .*$', r'\1endpoint = "local"', text)
    # random weights: the gates of a trained 8B cannot hold (a random network's near-ties make
    # every quant's KLD large, and it neither stops nor answers in Urdu); the benchmark measures
    # time, memory and bytes, and the figures still go to the verification table
    text = re.sub(r"(?m)^enforce_(urdu_purity|stop_token) = true", r"enforce_\1 = false", text)
    text = re.sub(r"(?m)^max_kld = .*$", "max_kld = 4.0", text)
    text = re.sub(r"(?m)^min_top1 = .*$", "min_top1 = 0.0", text)
    # the adapters here are built by the benchmark, not by the training stages: nothing to publish of them
    text = text.replace("publish_adapters = true", "publish_adapters = false")
    path = folder / "qalb.toml"
    path.write_text(text, encoding="utf-8")
    return path


def prepare(work: Path, layers: int, keep_build: bool = False) -> tuple[Path, Path]:
    """Inputs (once), the spec, the base stage, and the adapters where the training stages put
    theirs; ``keep_build`` keeps an earlier run's build folder (to go on from a stage)."""
    import importlib.util

    loader = importlib.util.spec_from_file_location("bench_merge", ROOT / "benchmarks" / "merge.py")
    merge_bench = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(merge_bench)
    base, cpt = merge_bench.build_inputs(work, layers)
    sft = merge_bench.build_adapter(work, layers, f"adapter-sft-r128-{layers}l", modules_to_save=[], base=base)
    build = work / "build"
    if not keep_build:
        shutil.rmtree(build, ignore_errors=True)
    spec_path = write_spec(work, base, build)
    from release import pipeline, spec

    s = spec.load(spec_path)
    for stage, adapter in (("cpt", cpt), ("sft", sft)):
        if not pipeline.folder(s, stage).exists():
            shutil.copytree(adapter, pipeline.folder(s, stage))
    return spec_path, build


def run_stages(spec_path: Path, build: Path, env: dict, start: str = STAGES[0]) -> list[Row]:
    rows = []
    for stage in STAGES[STAGES.index(start):]:
        before = shutil.disk_usage(build.parent).free / 1e9
        subprocess.run(["sync"])
        cmd = [sys.executable, "-m", "invoke", "--search-root", str(ROOT), "release", "--spec", str(spec_path),
               "--only", stage] + (["--push"] if stage == "publish" else [])
        print(f"{stage} ...", flush=True)
        row = measure(cmd, env, ROOT)
        row.stage = stage
        row.free_before_gb, row.free_after_gb = before, shutil.disk_usage(build.parent).free / 1e9
        print(f"  {row.seconds:.1f} s, RssAnon {row.anon_gb:.2f} GB, VmHWM {row.hwm_gb:.2f} GB", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the 8B-shaped model")
    p.add_argument("--work", default=str(ROOT / "build" / "bench"),
                   help="where inputs are built (once) and the release goes")
    p.add_argument("--keep", action="store_true", help="keep the built release (default: deleted after the report)")
    p.add_argument("--from", dest="start", choices=STAGES, default=STAGES[0],
                   help="go on from this stage in the kept build folder of an earlier run (with --keep)")
    p.add_argument("--hub-copy", action="store_true",
                   help="the local Hub stores what is pushed (default: it reads and checks every byte's sha256 but "
                        "stores sparse files, so the disk need not hold the release twice)")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    spec_path, build = prepare(work, args.layers, keep_build=args.start != STAGES[0])
    write_bw, read_bw = disk_bandwidth(work)
    print(f"disk: sequential write {write_bw / 1e9:.2f} GB/s, read {read_bw / 1e9:.2f} GB/s", flush=True)
    from release.localhub import HubServer
    from release.spec import load

    with HubServer(work / "hub", tokens=(TOKEN,), keep_lfs=args.hub_copy) as hub:
        key = work / "release.key"  # the release is signed, as a real one (release/signing.py)
        if not key.exists():
            from release import signing

            signing.keygen(key)
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "QALB_SIGNING_KEY": str(key)}
        subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), "release", "--spec",
                        str(spec_path), "--only", "base"], env=env, cwd=ROOT, check=True, capture_output=True)
        rows = run_stages(spec_path, build, env, args.start)
    report(load(spec_path), rows, write_bw, read_bw, args.layers)
    if not args.keep:
        shutil.rmtree(build, ignore_errors=True)
        shutil.rmtree(work / "hub", ignore_errors=True)


def _floors(spec, rows: list[Row], write_bw: float, read_bw: float) -> None:
    """The I/O floor of the stages that only move bytes: their files' bytes over the bandwidth."""
    from release import pipeline
    from release.artifacts import read_manifest

    for row in rows:
        if row.stage == "merge":
            m = read_manifest(pipeline.folder(spec, "merge"))
            base = sum(p.stat().st_size for p in pipeline.base_model_dir(spec).glob("*.safetensors"))
            adapters = sum(p.stat().st_size for s in ("cpt", "sft") for p in pipeline.folder(spec, s).glob("*"))
            written = sum(e.size for e in m.outputs)
            row.floor_s = (base + adapters) / read_bw + written / write_bw
        elif row.stage == "publish":
            staged = sum(p.stat().st_size for p in pipeline.folder(spec, "publish").rglob("*") if p.is_file())
            row.floor_s = staged / read_bw  # hashing reads every staged byte once; the links write nothing
    g = read_manifest(pipeline.folder(spec, "gguf"))
    f16 = g.figures["files"].get("F16") if g else None
    if f16:
        model = sum(p.stat().st_size for p in pipeline.variant_dir(spec, spec.flagship_key).glob("*.safetensors"))
        rows.append(Row("gguf F16 (part of gguf)", seconds=f16["seconds"],
                        floor_s=model / read_bw + f16["bytes"] / write_bw))


def report(spec, rows: list[Row], write_bw: float, read_bw: float, layers: int) -> None:
    from rich.console import Console
    from rich.table import Table

    _floors(spec, rows, write_bw, read_bw)
    t = Table(title=f"Qalb release at Llama 3.1 8B layer shapes, {layers} layers "
                    f"(disk: write {write_bw / 1e9:.2f} GB/s, read {read_bw / 1e9:.2f} GB/s)")
    for col in ("stage", "wall s", "RssAnon GB", "VmHWM GB", "RssFile GB", "read GB", "written GB",
                "free before GB", "free after GB", "x I/O floor"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for r in rows:
        t.add_row(r.stage, f"{r.seconds:.1f}", f"{r.anon_gb:.2f}", f"{r.hwm_gb:.2f}", f"{r.file_gb:.2f}",
                  f"{r.read_gb:.2f}", f"{r.written_gb:.2f}", f"{r.free_before_gb:.1f}", f"{r.free_after_gb:.1f}",
                  f"{r.seconds / r.floor_s:.2f}" if r.floor_s else "")
    Console(width=200).print(t)
    whole = sum(r.seconds for r in rows if r.stage in STAGES)
    from release import llama3, preflight, scaffold

    def parameters(n: int) -> int:
        return preflight.shapes(llama3.model_config(scaffold.eight_b_shaped(n))).total

    scale = parameters(32) / parameters(layers)
    print(f"merge to push: {whole / 60:.1f} min at {layers} layers; about {whole * scale / 60:.0f} min at 32 layers "
          f"(x{scale:.2f} parameters; the time of every stage here scales with the bytes it moves or computes on)")
    print(json.dumps({r.stage: {"seconds": round(r.seconds, 1), "anon_gb": round(r.anon_gb, 2),
                                "hwm_gb": round(r.hwm_gb, 2)} for r in rows}))


if __name__ == "__main__":
    main()
