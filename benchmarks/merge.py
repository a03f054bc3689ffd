"""Merge benchmark: ours vs PEFT on a model with Llama-3.1-8B layer shapes, side by side.

    .venv/bin/python benchmarks/merge.py [--layers 4] [--work build/bench]

Builds (once) an 8B-shaped BF16 model with N layers (vocab 128,256, hidden 4096, GQA 32/8,
MLP 14,336) and a rank-128 adapter in PEFT's format on all seven projections plus
``modules_to_save`` embed_tokens/lm_head, as Unsloth's continued pre-training writes it. Then
runs, each in its own process so peak RSS is its own:

- ours: ``release.merge.merge`` (streamed BF16 output, no FP16);
- PEFT: ``AutoModelForCausalLM.from_pretrained`` + ``PeftModel.from_pretrained`` +
  ``merge_and_unload`` + ``save_pretrained``.

Each tool runs ``--repeat`` times, alternating which goes first, after a ``sync``; the best wall
time and the highest peak RSS of each are kept. Prints them, the ratios, and an extrapolation to
32 layers by bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Peak RSS from /proc/self/status VmHWM: getrusage's ru_maxrss would also count the parent's
# memory at fork time, which survives exec.
HWM = """
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
"""

OURS = HWM + """
import json, sys, time
from pathlib import Path
from release import merge, spec
s = spec.load(sys.argv[1])
t = time.perf_counter()
merge.merge(Path(sys.argv[2]), [Path(sys.argv[3])], Path(sys.argv[4]), chat_spec=s.chat, inference=s.inference,
            max_shard_bytes=5_000_000_000, progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_gb": hwm()}))
"""

PEFT = HWM + """
import json, sys, time
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, sys.argv[3]).merge_and_unload()
model.save_pretrained(sys.argv[4], max_shard_size="5GB")
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_gb": hwm()}))
"""


def build_inputs(work: Path, layers: int, adapter: bool = True) -> tuple[Path, Path | None]:
    from release import scaffold, spec

    demo = spec.load(ROOT / "specs" / "demo.toml")
    base = work / f"base-8b-{layers}l"
    if not (base / "config.json").is_file():
        tmp = base.with_name(base.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"building the {layers}-layer 8B-shaped base model in {base} ...", flush=True)
        scaffold.write_model(tmp, scaffold.eight_b_shaped(layers), demo.chat, max_shard_bytes=5_000_000_000,
                             progress=True)
        tmp.rename(base)
    if not adapter:
        return base, None
    return base, build_adapter(work, layers, f"adapter-r128-{layers}l", ["embed_tokens", "lm_head"], base)


def build_adapter(work: Path, layers: int, name: str, modules_to_save: list[str], base: Path) -> Path:
    """A rank-128 PEFT adapter (alpha 32) on the seven projections of the 8B-shaped model, with
    ``modules_to_save`` (embed_tokens, lm_head) stored in full as Unsloth's CPT saves them."""
    import torch

    from release import scaffold, shards

    adapter = work / name
    if not (adapter / "adapter_config.json").is_file():
        print(f"building the rank-128 adapter in {adapter} ...", flush=True)
        tmp = adapter.with_name(adapter.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        sc = scaffold.eight_b_shaped(layers)
        shapes = dict(scaffold.tensor_shapes(sc))
        entries, makers = [], {}
        gen = torch.Generator().manual_seed(0)
        r = 128
        for name, shape in shapes.items():
            module = name.removesuffix(".weight")
            key = f"base_model.model.{module}"
            if name.endswith("proj.weight"):
                out_f, in_f = shape
                entries += [shards.Entry(f"{key}.lora_A.weight", torch.float32, (r, in_f)),
                            shards.Entry(f"{key}.lora_B.weight", torch.float32, (out_f, r))]
                makers[f"{key}.lora_A.weight"] = lambda s=(r, in_f): torch.randn(s, generator=gen) / math.sqrt(s[1])
                makers[f"{key}.lora_B.weight"] = lambda s=(out_f, r): torch.randn(s, generator=gen) * 0.01
            elif name in ("model.embed_tokens.weight", "lm_head.weight") and name.split(".")[-2] in modules_to_save:
                entries.append(shards.Entry(key + ".weight", torch.bfloat16, shape))
                makers[key + ".weight"] = lambda n=name, s=shape: (
                    scaffold.make_tensor(sc, n, s, torch.float32)
                    + 0.01 * torch.randn(s, generator=gen)).to(torch.bfloat16)
        entries.sort(key=lambda e: e.name)
        w = shards.ShardWriter(tmp / "adapter_model.safetensors", entries)
        for e in entries:
            w.write(e.name, makers[e.name]())
        w.close()
        (tmp / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": r, "lora_alpha": 32, "lora_dropout": 0.0, "bias": "none",
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "modules_to_save": modules_to_save or None, "use_rslora": False, "use_dora": False,
            "fan_in_fan_out": False, "base_model_name_or_path": str(base), "task_type": "CAUSAL_LM",
            "init_lora_weights": True, "inference_mode": True}, indent=2))
        tmp.rename(adapter)
    return adapter


def run(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def alternate(tools: dict[str, Callable[[], dict]], repeat: int) -> dict[str, dict]:
    """Run each tool ``repeat`` times, alternating which goes first, each after a ``sync`` (so no
    run pays for the last one's dirty pages). Keeps each tool's best wall time and its highest
    peak RSS over all runs."""
    results: dict[str, dict] = {}
    names = list(tools)
    for round_ in range(repeat):
        for tool in (names if round_ % 2 == 0 else names[::-1]):
            subprocess.run(["sync"])
            print(f"round {round_ + 1}: running {tool} ...", flush=True)
            r = tools[tool]()
            print(f"  {r['seconds']:.1f} s, peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
            best = results.get(tool)
            peak = max(r["peak_rss_gb"], best["peak_rss_gb"] if best else 0)
            results[tool] = {**(r if best is None or r["seconds"] < best["seconds"] else best), "peak_rss_gb": peak}
    return results


def arguments(doc: str, layers: int) -> argparse.Namespace:
    """The options every benchmark here takes."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--layers", type=int, default=layers, help="decoder layers of the 8B-shaped model")
    p.add_argument("--work", default=str(ROOT / "build" / "bench"), help="where inputs are built (once) and outputs go")
    p.add_argument("--repeat", type=int, default=2, help="rounds, alternating the order; best of each kept")
    return p.parse_args()


def main() -> None:
    args = arguments(__doc__, layers=4)
    work = Path(args.work)
    base, adapter = build_inputs(work, args.layers)
    spec_path = str(ROOT / "specs" / "demo.toml")

    def tool(name: str, code: str) -> Callable[[], dict]:
        def go() -> dict:
            out = work / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            r = run(code, spec_path, str(base), str(adapter), str(out))
            r["bytes"] = folder_bytes(out)
            shutil.rmtree(out, ignore_errors=True)
            return r
        return go

    results = alternate({"ours": tool("ours", OURS), "peft": tool("peft", PEFT)}, args.repeat)

    from rich.console import Console
    from rich.table import Table

    o, q = results["ours"], results["peft"]
    model_gb = folder_bytes(base) / 1e9
    table = Table(title=f"LoRA merge, {args.layers}-layer Llama-3.1-8B-shaped model ({model_gb:.2f} GB BF16), rank 128")
    for col in ("", "wall s", "peak RSS GB", "output GB"):
        table.add_column(col, justify="right")
    table.add_row("ours", f"{o['seconds']:.1f}", f"{o['peak_rss_gb']:.2f}", f"{o['bytes'] / 1e9:.2f}")
    table.add_row("PEFT", f"{q['seconds']:.1f}", f"{q['peak_rss_gb']:.2f}", f"{q['bytes'] / 1e9:.2f}")
    table.add_row("ours / PEFT", f"{o['seconds'] / q['seconds']:.2f}x",
                  f"{o['peak_rss_gb'] / q['peak_rss_gb']:.3f}x", "")
    Console().print(table)
    full = 16.06e9 / folder_bytes(base)  # Llama 3.1 8B in BF16 is 16.06 GB
    print(f"extrapolated to 32 layers (x{full:.1f} bytes): ours ~{o['seconds'] * full / 60:.1f} min, "
          f"PEFT ~{q['seconds'] * full / 60:.1f} min; peak RSS ours ~{o['peak_rss_gb']:.1f} GB (blocks, "
          f"independent of size), PEFT ~{q['peak_rss_gb'] * full:.0f} GB (grows with the model)")


if __name__ == "__main__":
    main()
