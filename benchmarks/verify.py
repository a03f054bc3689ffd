"""Verification benchmark at Llama-3.1-8B layer shapes: the streamed float32 reference vs the
whole model loaded in float32 (how the reference was computed before), side by side.

    .venv/bin/python benchmarks/verify.py [--layers 2] [--work build/bench]

Builds (once) an 8B-shaped BF16 model with N layers, as benchmarks/merge.py does, and its NF4
variant (``release.bnb4``). Then runs, each in its own process so its memory is its own, on the
Qalb spec's fidelity text and chunks (8 x 512 = 4,096 positions):

- before: ``AutoModelForCausalLM.from_pretrained(dtype=float32)``, one chunk per call;
- streamed: ``verify.reference`` (``release/forward.py``: a decoder layer at a time, logits to a
  memory-mapped file), then ``verify.hf_fidelity`` of the NF4 variant against it;
- generation: ``verify.hf_generations`` of the BF16 and NF4 variants in their stored dtype, one
  prompt, 32 new tokens.

Each process samples its anonymous memory (RssAnon) every 20 ms beside VmHWM; file-backed pages
(mapped weights, the reference file) are reclaimable and not counted. Chunk 0's logits of both
reference routes are compared, in float32 ulps of the largest logit. Ends with an extrapolation
to 32 layers by the weights each token reads (decoder layers plus the output projection).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# not this folder on the path: its gguf.py would shadow the gguf package that spec checks import
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]


def _merge_benchmark():
    import importlib.util

    loader = importlib.util.spec_from_file_location("bench_merge", ROOT / "benchmarks" / "merge.py")
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


arguments, build_inputs, run = (getattr(_merge_benchmark(), n) for n in ("arguments", "build_inputs", "run"))

SAMPLER = """
import json, sys, threading, time
from pathlib import Path
peak = {"RssAnon": 0, "VmHWM": 0}
def sample():
    for line in open("/proc/self/status"):
        key = line.split(":")[0]
        if key in peak:
            peak[key] = max(peak[key], int(line.split()[1]) * 1024)
def loop():
    while True:
        sample()
        time.sleep(0.02)
threading.Thread(target=loop, daemon=True).start()
def report(**figures):
    sample()
    print(json.dumps({**figures, "anon_gb": peak["RssAnon"] / 1e9, "hwm_gb": peak["VmHWM"] / 1e9}))
import numpy as np
import torch
from transformers import AutoTokenizer
from release import verify
from release.spec import load
spec = load(sys.argv[1])
model, other, save = Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
tok = AutoTokenizer.from_pretrained(model)
chunks = verify.text_chunks(spec, tok)
positions = sum(map(len, chunks))
"""

BEFORE = SAMPLER + """
from transformers import AutoModelForCausalLM
t = time.perf_counter()
m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
with torch.no_grad():
    for i, ids in enumerate(chunks):
        logits = m(torch.tensor([ids])).logits[0]
        if i == 0:
            np.save(save, logits.numpy())
report(seconds=time.perf_counter() - t, tokens_per_s=positions / (time.perf_counter() - t))
"""

STREAMED = SAMPLER + """
t = time.perf_counter()
with verify.reference(model, chunks, "cpu", workdir=save.parent) as ref:
    np.save(save, np.asarray(ref.logits[:len(chunks[0])]))
    reference = {"seconds": time.perf_counter() - t, "tokens_per_s": ref.tokens_per_s,
                 "anon_gb": peak["RssAnon"] / 1e9}
    peak["RssAnon"] = 0
    t = time.perf_counter()
    nf4 = verify.hf_fidelity(other, ref, "cpu")
report(reference=reference, seconds=time.perf_counter() - t, tokens_per_s=nf4["fidelity_tokens_per_s"],
       kld=nf4["kld_mean"])
"""

GENERATION = SAMPLER + """
import dataclasses
ev = dataclasses.replace(spec.evaluation, generation_prompts=1, max_new_tokens=32)
gens, seconds = verify.hf_generations(model, tok, dataclasses.replace(spec, evaluation=ev), "cpu")
report(seconds=seconds, tokens_per_s=sum(len(g.tokens) for g in gens) / seconds)
"""


def nf4_variant(work: Path, base: Path, layers: int) -> Path:
    from release import bnb4, spec

    out = work / f"nf4-8b-{layers}l"
    if not (out / "config.json").is_file():
        print(f"building the NF4 variant in {out} ...", flush=True)
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        _, v = bnb4.variant(spec.load(ROOT / "specs" / "qalb.toml"))
        bnb4.quantize_model(base, tmp, v, max_shard_bytes=5_000_000_000, progress=False)
        bnb4.write_model_files(base, tmp, v)
        tmp.rename(out)
    return out


def main() -> None:
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    args = arguments(__doc__, layers=2)
    work = Path(args.work)
    base, _ = build_inputs(work, args.layers, adapter=False)
    nf4 = nf4_variant(work, base, args.layers)
    spec_path = str(ROOT / "specs" / "qalb.toml")
    saved = {k: work / f"verify-{k}-chunk0.npy" for k in ("before", "streamed")}
    print("before: the whole model in float32 ...", flush=True)
    before = run(BEFORE, spec_path, str(base), str(nf4), str(saved["before"]))
    print("streamed: the reference, then the NF4 variant's fidelity ...", flush=True)
    streamed = run(STREAMED, spec_path, str(base), str(nf4), str(saved["streamed"]))
    print("generation in the stored dtype: BF16, NF4 ...", flush=True)
    gen = {name: run(GENERATION, spec_path, str(path), str(nf4), str(saved["streamed"]))
           for name, path in (("BF16", base), ("NF4", nf4))}
    a, b = np.load(saved["before"]), np.load(saved["streamed"])
    ulps = float(np.abs(a - b).max()) / (np.finfo(np.float32).eps * float(np.abs(a).max()))
    for p in saved.values():
        p.unlink()

    table = Table(title=f"verification, {args.layers}-layer Llama-3.1-8B-shaped model, 4,096 positions")
    for col in ("", "wall s", "tokens/s", "peak RssAnon GB", "VmHWM GB"):
        table.add_column(col, justify="right")
    ref = streamed["reference"]
    table.add_row("before: BF16 reference, whole model in float32", f"{before['seconds']:.0f}",
                  f"{before['tokens_per_s']:.1f}", f"{before['anon_gb']:.2f}", f"{before['hwm_gb']:.2f}")
    table.add_row("streamed: BF16 reference", f"{ref['seconds']:.0f}", f"{ref['tokens_per_s']:.1f}",
                  f"{ref['anon_gb']:.2f}", "")
    table.add_row(f"streamed: NF4 fidelity (KLD {streamed['kld']:.4f})", f"{streamed['seconds']:.0f}",
                  f"{streamed['tokens_per_s']:.1f}", f"{streamed['anon_gb']:.2f}", f"{streamed['hwm_gb']:.2f}")
    for name, g in gen.items():
        table.add_row(f"generation {name} (stored dtype, 32 tokens)", f"{g['seconds']:.0f}", f"{g['tokens_per_s']:.2f}",
                      f"{g['anon_gb']:.2f}", f"{g['hwm_gb']:.2f}")
    table.caption = (f"chunk 0 logits, before vs streamed: largest difference {ulps:.1f} float32 ulps of the largest "
                     "logit (the decoder layers agree bit for bit; the output projection, in blocks of rows, "
                     "sums in another order)")
    Console().print(table)
    scale = (525 + 32 * 218) / (525 + args.layers * 218)  # weights read per token (millions): layers + head
    size = (2 * 525 + 32 * 218) / (2 * 525 + args.layers * 218)  # weights held: layers + embedding + head
    print(f"extrapolated to 32 layers (x{scale:.1f} weights per token): streamed reference ~"
          f"{ref['seconds'] * scale / 60:.0f} min per transformers variant, generation ~"
          f"{gen['BF16']['tokens_per_s'] / scale:.2f} tok/s BF16, {gen['NF4']['tokens_per_s'] / scale:.2f} tok/s NF4; "
          f"peak RssAnon flat (one layer in float32); before: ~{before['anon_gb'] * size:.0f} GB")


if __name__ == "__main__":
    main()
