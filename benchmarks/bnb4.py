"""bitsandbytes 4-bit benchmark: ours (streamed) vs transformers, side by side.

    .venv/bin/python benchmarks/bnb4.py [--layers 4] [--repeat 2] [--work build/bench]

Uses (building it once) a BF16 model with Llama-3.1-8B layer shapes and N layers, as
benchmarks/merge.py does, and the demo spec's NF4 variant (double quantization, BF16 compute).
Each tool runs in its own process so peak RSS (VmHWM) is its own:

- ours: ``release.bnb4.quantize_model`` (one tensor in memory at a time);
- transformers: ``AutoModelForCausalLM.from_pretrained(quantization_config=BitsAndBytesConfig(...))``
  + ``save_pretrained``, the route the Hub's bnb-4bit repos are made with.

Each runs ``--repeat`` times, alternating which goes first, after a ``sync``; the best wall time and
the highest peak RSS of each are kept. Afterwards the two outputs are compared tensor by tensor
(they must be bit-identical, or the timing compares different work).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from merge import HWM, alternate, arguments, build_inputs, folder_bytes, run  # noqa: E402

OURS = HWM + """
import json, sys, time
from pathlib import Path
from release import bnb4, spec
s = spec.load(sys.argv[1])
_, v = bnb4.variant(s)
t = time.perf_counter()
bnb4.quantize_model(Path(sys.argv[2]), Path(sys.argv[3]), v, max_shard_bytes=5_000_000_000, progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_gb": hwm()}))
"""

TRANSFORMERS = HWM + """
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from release import bnb4, spec
s = spec.load(sys.argv[1])
_, v = bnb4.variant(s)
cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=v.dtype, bnb_4bit_use_double_quant=v.double_quant,
                         bnb_4bit_compute_dtype=getattr(torch, v.compute_dtype or "bfloat16"))
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[2], quantization_config=cfg, dtype=torch.bfloat16)
model.save_pretrained(sys.argv[3], max_shard_size="5GB")
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_gb": hwm()}))
"""


def differing_tensors(a: Path, b: Path) -> list[str]:
    """Names whose bytes differ (or that only one side has), one tensor at a time."""
    import torch
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    ia, ib = index(a), index(b)
    bad = sorted(set(ia) ^ set(ib))
    for name in sorted(set(ia) & set(ib)):
        with safe_open(ia[name], "pt") as ha, safe_open(ib[name], "pt") as hb:
            x, y = ha.get_tensor(name), hb.get_tensor(name)
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
                bad.append(name)
    return bad


def main() -> None:
    args = arguments(__doc__, layers=4)
    work = Path(args.work)
    base, _ = build_inputs(work, args.layers, adapter=False)
    spec_path = str(ROOT / "specs" / "demo.toml")

    def tool(code: str, out: Path):
        def go() -> dict:
            shutil.rmtree(out, ignore_errors=True)
            return {**run(code, spec_path, str(base), str(out)), "bytes": folder_bytes(out)}
        return go

    results = alternate({"ours": tool(OURS, work / "q4-ours"),
                         "transformers": tool(TRANSFORMERS, work / "q4-transformers")}, args.repeat)
    bad = differing_tensors(work / "q4-ours", work / "q4-transformers")
    for tool in results:
        shutil.rmtree(work / f"q4-{tool}", ignore_errors=True)

    from rich.console import Console
    from rich.table import Table

    o, t = results["ours"], results["transformers"]
    model_gb = folder_bytes(base) / 1e9
    table = Table(title=f"BF16 -> NF4 (double quant), {args.layers}-layer Llama-3.1-8B-shaped model "
                        f"({model_gb:.2f} GB)")
    for col in ("", "wall s", "peak RSS GB", "output GB"):
        table.add_column(col, justify="right")
    table.add_row("ours", f"{o['seconds']:.1f}", f"{o['peak_rss_gb']:.2f}", f"{o['bytes'] / 1e9:.2f}")
    table.add_row("transformers", f"{t['seconds']:.1f}", f"{t['peak_rss_gb']:.2f}", f"{t['bytes'] / 1e9:.2f}")
    table.add_row("ours / transformers", f"{o['seconds'] / t['seconds']:.2f}x",
                  f"{o['peak_rss_gb'] / t['peak_rss_gb']:.3f}x", "")
    Console().print(table)
    print("outputs bit-identical, tensor by tensor" if not bad else f"outputs DIFFER in {len(bad)} tensors: {bad[:5]}")
    full = 16.06e9 / folder_bytes(base)  # Llama 3.1 8B in BF16 is 16.06 GB
    print(f"extrapolated to 32 layers (x{full:.1f} bytes): ours ~{o['seconds'] * full / 60:.1f} min, "
          f"transformers ~{t['seconds'] * full / 60:.1f} min")
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
