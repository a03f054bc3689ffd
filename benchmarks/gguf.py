"""GGUF conversion benchmark: ours vs llama.cpp's convert_hf_to_gguf.py, F16, side by side.

    .venv/bin/python benchmarks/gguf.py [--layers 2] [--repeat 2]

Uses (building it once) a BF16 model with Llama-3.1-8B layer shapes and N layers, as
benchmarks/merge.py does. The reference converter comes from llama-cpp-python's source
distribution of the installed version (see tests/llamacpp.py). Each tool runs in its own process,
``--repeat`` times with the order alternating and a ``sync`` before each; the best wall time and
the highest peak RSS (VmHWM) of each are kept.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

OURS = """
import json, sys, time
from pathlib import Path
from release import gguf, spec
s = spec.load(sys.argv[1])
t = time.perf_counter()
gguf.convert(Path(sys.argv[2]), Path(sys.argv[3]), s, "F16", progress=False)
seconds = time.perf_counter() - t
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024**2
print(json.dumps({"seconds": seconds, "peak_rss_gb": hwm}))
"""


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time and peak RSS of a child process (GNU time's max RSS of that child only)."""
    t = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *cmd], capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    rss_kb = int(next(ln for ln in out.stderr.splitlines() if ln.startswith("MAXRSS")).split()[1])
    return {"seconds": seconds, "peak_rss_gb": rss_kb / 1024**2}


def main() -> None:
    import llamacpp
    from merge import alternate, arguments, build_inputs  # the same 8B-shaped model as the merge benchmark

    args = arguments(__doc__, layers=2)
    if not Path("/usr/bin/time").exists():
        raise SystemExit("needs GNU time (/usr/bin/time): apt-get install time")
    work = Path(args.work)
    base, _ = build_inputs(work, args.layers, adapter=False)
    ref_dir = llamacpp.converter_dir()
    spec = str(ROOT / "specs" / "demo.toml")
    cmds = {
        "ours": [sys.executable, "-c", OURS, spec, str(base), str(work / "ours.gguf")],
        "llama.cpp": [sys.executable, str(ref_dir / "convert_hf_to_gguf.py"), str(base), "--outfile",
                      str(work / "ref.gguf"), "--outtype", "f16"],
    }
    env = {**os.environ, "PYTHONPATH": str(ref_dir / "gguf-py")}
    results = alternate({tool: (lambda tool=tool: timed(cmds[tool], env if tool == "llama.cpp" else None))
                         for tool in cmds}, args.repeat)
    same = subprocess.run(["cmp", "-s", str(work / "ours.gguf"), str(work / "ref.gguf")]).returncode == 0
    for f in ("ours.gguf", "ref.gguf"):
        (work / f).unlink(missing_ok=True)

    from rich.console import Console
    from rich.table import Table

    o, q = results["ours"], results["llama.cpp"]
    size = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
    table = Table(title=f"HF -> GGUF F16, {args.layers}-layer Llama-3.1-8B-shaped model ({size:.2f} GB BF16)")
    for col in ("", "wall s", "peak RSS GB"):
        table.add_column(col, justify="right")
    table.add_row("ours", f"{o['seconds']:.1f}", f"{o['peak_rss_gb']:.2f}")
    table.add_row("llama.cpp convert_hf_to_gguf.py", f"{q['seconds']:.1f}", f"{q['peak_rss_gb']:.2f}")
    table.add_row("ours / llama.cpp", f"{o['seconds'] / q['seconds']:.2f}x",
                  f"{o['peak_rss_gb'] / q['peak_rss_gb']:.2f}x")
    Console().print(table)
    print(f"files byte-identical: {same} (metadata differs: ours writes the release's general.* and chat template)")


if __name__ == "__main__":
    main()
