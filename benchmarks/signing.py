"""What signing a release costs: reads of the published bytes, and time against one sequential read.

    .venv/bin/python benchmarks/signing.py --reads          # the demo release, signed and pushed
    .venv/bin/python benchmarks/signing.py --layers 8       # an 8B-shaped merged model, 8 layers

``--reads`` builds the demo release into a fresh folder, signs it and pushes it to a local Hub
with every full hash of a file logged (``QALB_HASH_LOG``), then counts, for each published file,
how many times it was read again to be hashed after it was written, and by which module. (The
reads that use the bytes, verification's load and the upload, are one each by design.)

``--layers N`` builds the flagship BF16 model of benchmarks/release.py (8B layer shapes, N
layers) and times, on its files in one run: one sequential read; the release's signing, which
builds ``provenance.intoto.json`` and ``model.sig`` from the merge manifest's digests; and
model_signing's own ``sign``, which hashes every file, as the reference. Ratios are to the read.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
TOKEN = "hf_bench_signing"


def _inv(*args: str, env: dict, cwd: Path, root: Path = ROOT) -> None:
    subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(root), *args], env=env, cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL)


def reads(work: Path, checkout: Path = ROOT) -> None:
    """The demo, signed and pushed, with every full hash logged: reads per published byte.
    ``checkout``: another checkout of the toolchain to run (an earlier commit, for the figure
    before; it signs nothing if it cannot), whose ``sha256_file`` logs as this one's does."""
    from release import signing
    from release.localhub import HubServer
    from release.spec import load

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copytree(checkout / "specs", work / "specs")
    spec_path = work / "specs" / "demo.toml"
    spec_path.write_text(spec_path.read_text(encoding="utf-8").replace('dir = "../build"', f'dir = "{work / "build"}"'),
                         encoding="utf-8")
    key = work / "release.key"
    signing.keygen(key)
    log = work / "hashes.tsv"
    with HubServer(work / "hub", tokens=(TOKEN,)) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "QALB_HASH_LOG": str(log)}
        env.pop("HF_HUB_OFFLINE", None)
        start = time.perf_counter()
        signed = ["--signing-key", str(key)] if (checkout / "release" / "signing.py").is_file() else []
        _inv("release", "--spec", str(spec_path), "--push", *signed, env=env, cwd=work, root=checkout)
        print(f"demo release, signed and pushed: {time.perf_counter() - start:.0f} s")
    spec = load(spec_path)
    # a file by device, inode, size and mtime: inode numbers of deleted files (checkpoints) are reused
    published: dict[str, Path] = {}
    for f in sorted((spec.build_dir / "publish").rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".gguf"):
            st = f.stat()
            published.setdefault(f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}", f)
    reads_of: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in log.read_text(encoding="utf-8").splitlines():
        key, _, caller, _ = line.split("\t", 3)
        if key in published:
            reads_of[key][caller] += 1
    kinds: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    nbytes: collections.Counter = collections.Counter()
    for key, f in published.items():
        kind = f.parent.name.removeprefix(spec.release.name).lstrip("-") or "BF16"
        size = f.stat().st_size
        nbytes[kind] += size
        for caller, k in reads_of[key].items():
            kinds[kind][caller] += k * size
    weight = sum(nbytes.values())
    total: collections.Counter = sum(kinds.values(), collections.Counter())
    print(f"\npublished weight files: {len(published)}, {weight:,} bytes")
    print("| repo | weight bytes | full hashes after writing, per byte (by module) |")
    print("|---|---|---|")
    for kind in sorted(nbytes):
        per = {c: b / nbytes[kind] for c, b in kinds[kind].items()}
        print(f"| {kind} | {nbytes[kind]:,} | {sum(per.values()):.2f} "
              f"({', '.join(f'{c} {v:.2f}' for c, v in sorted(per.items())) or 'none'}) |")
    print(f"| all | {weight:,} | {sum(total.values()) / weight:.2f} "
          f"({', '.join(f'{c} {v / weight:.2f}' for c, v in sorted(total.items()))}) |")


def _read(files: list[Path], chunk: int = 1 << 22) -> None:
    buf = bytearray(chunk)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def _drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def cost(work: Path, layers: int) -> None:
    """Signing's time on the 8B-shaped flagship, beside one read and model_signing's own sign."""
    from model_signing import hashing
    from model_signing import signing as ms_signing

    from release import pipeline, provenance, signing
    from release.artifacts import read_manifest
    from release.spec import load

    loader = importlib.util.spec_from_file_location("bench_release", ROOT / "benchmarks" / "release.py")
    bench = importlib.util.module_from_spec(loader)
    sys.modules["bench_release"] = bench  # its data classes look their module up
    loader.loader.exec_module(bench)
    spec_path, build = bench.prepare(work, layers)
    env = {**os.environ}
    for stage in ("base", "merge"):
        _inv("release", "--spec", str(spec_path), "--only", stage, env=env, cwd=ROOT)
    spec = load(spec_path)
    folder = pipeline.variant_dir(spec, spec.flagship_key)
    merged = read_manifest(pipeline.folder(spec, "merge"))
    sub = folder.relative_to(pipeline.folder(spec, "merge")).as_posix()
    digests = {e.path.removeprefix(f"{sub}/"): e.sha256 for e in merged.outputs if e.path.startswith(f"{sub}/")}
    files = [folder / p for p in digests]
    nbytes = sum(f.stat().st_size for f in files)
    key = Path(tempfile.mkdtemp()) / "release.key"
    signing.keygen(key)
    cold = _drop_caches()
    times = {}
    start = time.perf_counter()
    _read(files)
    times["one sequential read"] = time.perf_counter() - start
    out = Path(tempfile.mkdtemp())
    _drop_caches()
    start = time.perf_counter()
    deps = provenance.dependencies(spec, {n: pipeline.folder(spec, n) for n in provenance.FEEDS}, None)
    (out / signing.PROVENANCE).write_text(provenance.dumps(provenance.statement(
        spec, spec.flagship.repo, {p: d for p, d in digests.items() if p.endswith(".safetensors")}, deps, None)))
    signing.sign(out / signing.SIGNATURE, spec.flagship.repo.split("/")[-1], digests, signing.load_key(key))
    times["the release's signing (provenance + model.sig from the manifests' digests)"] = time.perf_counter() - start
    _drop_caches()
    start = time.perf_counter()
    ms_signing.Config().use_elliptic_key_signer(private_key=key).set_hashing_config(
        hashing.Config().set_ignored_paths(paths=[])).sign(folder, out / "reference.sig")
    times["model_signing's sign (hashes every file), the reference"] = time.perf_counter() - start
    read = times["one sequential read"]
    print(f"\n{layers} layers of 8B shape: the flagship's {len(files)} files, {nbytes / 1e9:.2f} GB; page cache "
          f"{'dropped before each' if cold else 'not droppable here: every pass reads from memory'}")
    print("| what | seconds | x one read |")
    print("|---|---|---|")
    for what, s in times.items():
        print(f"| {what} | {s:.3f} | {s / read:.3f} |")
    print(json.dumps({k: round(v, 3) for k, v in times.items()}))


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reads", action="store_true", help="count reads per published byte on the demo release")
    p.add_argument("--layers", type=int, default=0, help="time signing on an 8B-shaped model of N layers")
    p.add_argument("--work", default=str(ROOT / "build" / "bench-signing"))
    p.add_argument("--checkout", default=str(ROOT), help="with --reads: the toolchain checkout to run")
    args = p.parse_args()
    if args.reads:
        reads(Path(args.work) / "demo", Path(args.checkout).resolve())
    if args.layers:
        cost(Path(args.work) / "8b", args.layers)


if __name__ == "__main__":
    main()
