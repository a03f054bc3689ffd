"""Verification: every variant loads in its runtime and generates with the release's template.

GGUF files run in llama.cpp (llama-cpp-python). Generation follows Ollama's runner: greedy or
sampled tokens are turned into text *with* special tokens, the run ends at an end-of-generation
token, and stop strings are matched on the text (the text before the first stop is returned).
This is what makes a missing stop token visible: header tokens in the output.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from release.artifacts import Manifest
from release.errors import VerifyError
from release.spec import Gate, Spec


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: list[int]
    reason: str  # "eog" (end-of-generation token), "stop:<string>", or "length"


def load_gguf(path: Path, n_ctx: int = 512, vocab_only: bool = False, **kwargs):
    """A llama.cpp model without the CPU backend's extra buffer types (weight repacking for
    AMX/AVX-512 kernels): on CPUs that report AMX without the OS enabling its tile state (seen in
    virtual machines) those kernels crash on any quantized batch. Verification needs the
    numbers, not the speed."""
    import llama_cpp
    import llama_cpp.llama as llama_module

    defaults = llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, vocab_only=vocab_only, verbose=False,
                               n_threads=2, seed=0, **kwargs)
    finally:
        llama_module.llama_cpp.llama_model_default_params = defaults


def generate_gguf(llm, prompt: str, stops: list[str], max_tokens: int) -> Generation:
    """Greedy generation of ``prompt`` (rendered by the release's template, without BOS: llama.cpp
    adds it) with Ollama's stop semantics."""
    import llama_cpp

    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    out: list[int] = []
    raw = b""
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            return Generation(raw.decode("utf-8", "replace"), out, "eog")
        out.append(token)
        raw += llm.detokenize([token], special=True)
        text = raw.decode("utf-8", "replace")
        hits = [(text.find(s), s) for s in stops if s in text]
        if hits:
            at, stop = min(hits)
            return Generation(text[:at], out, f"stop:{stop}")
        if len(out) >= max_tokens:
            break
    return Generation(raw.decode("utf-8", "replace"), out, "length")


# Fixed prompts for fidelity measurements: Urdu first (the release's language), then English.
PROMPTS = [
    "پاکستان کا دارالحکومت کون سا شہر ہے؟",
    "اردو زبان کی تاریخ مختصراً بیان کریں۔",
    "علامہ اقبال کی ایک مشہور نظم کا نام بتائیں اور اس کا مرکزی خیال لکھیں۔",
    "صحت مند رہنے کے لیے تین مشورے دیں۔",
    "What is the capital of Pakistan?",
    "Write one sentence about the monsoon in Lahore.",
]


@dataclass(frozen=True)
class Reference:
    """Token ids of the prompts (rendered with the release's chat template) and the BF16 model's
    next-token log-probabilities at every position, computed by transformers in float32."""

    ids: list[list[int]]
    logprobs: list  # list of torch tensors [positions, vocab]
    logits: list


def hf_logits(model_dir: Path, spec, prompts: list[str] | None = None) -> Reference:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from release import chat

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # bf16 -> f32 is exact
    ids, logprobs, logits = [], [], []
    for text in prompts or PROMPTS:
        x = tok.apply_chat_template([{"role": "user", "content": text}], chat_template=chat.jinja_template(spec.chat),
                                    add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        x = list(x)
        with torch.no_grad():
            out = model(torch.tensor([x])).logits[0].float()
        ids.append(x)
        logits.append(out)
        logprobs.append(torch.log_softmax(out, dim=-1))
    return Reference(ids, logprobs, logits)


def compare(ref: Reference, logits: list) -> dict:
    """Mean KL divergence KL(BF16 || variant) of the next-token distributions over every position
    of the prompts, the share of positions whose top token agrees, and the largest logit
    difference."""
    import torch

    kl, agree, positions, max_dlogit = 0.0, 0, 0, 0.0
    for lp, lg, q in zip(ref.logprobs, ref.logits, logits):
        q = q.float()
        lq = torch.log_softmax(q, dim=-1)
        kl += float((lp.exp() * (lp - lq)).sum(dim=-1).sum())
        agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
        positions += lp.shape[0]
        max_dlogit = max(max_dlogit, float((q - lg).abs().max()))
    return {"kld_mean": round(kl / positions, 6), "top1": round(agree / positions, 4),
            "max_abs_dlogit": round(max_dlogit, 4), "positions": positions}


def gguf_fidelity(path: Path, ref: Reference) -> dict:
    """``compare`` for a GGUF file run by llama.cpp."""
    import numpy as np
    import torch

    n_ctx = max(len(x) for x in ref.ids) + 8
    # float32 KV cache: measure the weights, not llama.cpp's default f16 cache
    llm = load_gguf(path, n_ctx=n_ctx, logits_all=True, type_k=0, type_v=0)
    logits = []
    for ids in ref.ids:
        llm.reset()
        llm.eval(ids)
        logits.append(torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32)))
    llm.close()
    return compare(ref, logits)


def hf_fidelity(model, ref: Reference) -> dict:
    """``compare`` for a model loaded in transformers."""
    import torch

    with torch.no_grad():
        return compare(ref, [model(torch.tensor([ids])).logits[0].float() for ids in ref.ids])


# --- Urdu purity ------------------------------------------------------------------------------

URDU_PROMPTS = PROMPTS[:4]


def urdu_purity(texts: list[str]) -> float:
    """Share of Urdu-script letters (release/urdu.py, as curation's script filter counts them)
    among all letters of ``texts`` (0.0 when there are none)."""
    from release import urdu

    counts = [urdu.count_letters(t) for t in texts]
    letters = sum(n for _, n in counts)
    return round(sum(u for u, _ in counts) / letters, 4) if letters else 0.0


# --- the verify stage -------------------------------------------------------------------------

STAGE = "verify"


@dataclass(frozen=True)
class Target:
    """One thing that ships: a transformers folder or one GGUF file."""

    key: str  # "bf16", "fp16", "bnb4" (the [variants] keys) or "gguf:<TYPE>"
    variant: str
    quant: str | None
    runtime: str  # "transformers" or "llama-cpp-python"
    path: Path
    gate: Gate | None
    reference: bool  # the flagship: what the others are measured against


def targets(spec: Spec, models: dict[str, Path]) -> list[Target]:
    """Every variant of the spec, GGUF types one by one; ``models`` maps variant key -> folder."""
    out = []
    for key, v in spec.variants.items():
        if key not in models:
            raise VerifyError(f"{spec.path}: variants.{key}: no built model to verify; build it first")
        if v.format == "gguf":
            out += [Target(f"gguf:{q}", key, q, "llama-cpp-python", Path(models[key]) / spec.gguf_file_name(q),
                           spec.gates.get(q), False) for q in spec.gguf_types()]
        else:
            out.append(Target(key, key, None, "transformers", Path(models[key]), spec.gates.get(key),
                              v is spec.flagship))
    return out


def weight_files(t: Target) -> list[Path]:
    if t.runtime == "llama-cpp-python":
        return [t.path]
    return sorted(t.path.glob("*.safetensors"))


def _generate_hf(model, tok, spec: Spec, prompt: str) -> Generation:
    import torch
    from transformers import GenerationConfig

    from release import chat

    eos = chat.eos_token_ids(spec.chat)
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], chat_template=chat.jinja_template(spec.chat),
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    config = GenerationConfig(max_new_tokens=spec.evaluation.max_new_tokens, do_sample=False, eos_token_id=eos,
                              pad_token_id=tok.convert_tokens_to_ids(spec.chat.pad_token))
    with torch.no_grad():
        new = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)[0, ids.shape[1]:].tolist()
    stopped = bool(new) and new[-1] in eos
    text = tok.decode(new[:-1] if stopped else new, skip_special_tokens=False)
    return Generation(text, new, "eog" if stopped else "length")


def _gguf_prompt(tok, spec: Spec, prompt: str) -> str:
    """The release's template rendered as text, without the BOS llama.cpp adds itself."""
    from release import chat

    text = tok.apply_chat_template([{"role": "user", "content": prompt}], chat_template=chat.jinja_template(spec.chat),
                                   add_generation_prompt=True, tokenize=False)
    return text.removeprefix(spec.chat.bos_token)


def check(spec: Spec, t: Target, ref: Reference, tok) -> dict:
    """Gates 1-3 for one target: loads and generates (stopping at a stop token), fidelity vs
    BF16 within the spec's gate, Urdu purity of greedy answers to Urdu prompts."""
    import torch
    from transformers import AutoModelForCausalLM

    from release import chat

    start = time.perf_counter()
    row: dict = {"runtime": t.runtime, "variant": t.variant, "quant": t.quant,
                 "kld_mean": None, "top1": None, "max_abs_dlogit": None,
                 "max_kld": t.gate.max_kld if t.gate else None, "min_top1": t.gate.min_top1 if t.gate else None}
    try:
        if t.runtime == "transformers":
            # float32 compute where the stored weights allow it: measure the weights, not the matmuls
            config = json.loads((t.path / "config.json").read_text(encoding="utf-8"))
            quantized = "quantization_config" in config
            model = AutoModelForCausalLM.from_pretrained(t.path, dtype=torch.bfloat16 if quantized else torch.float32)
            model.eval()
            if not t.reference:
                row.update(hf_fidelity(model, ref))
            gens = [_generate_hf(model, tok, spec, p) for p in URDU_PROMPTS]
            del model
        else:
            row.update(gguf_fidelity(t.path, ref))
            llm = load_gguf(t.path, n_ctx=1024)
            stops = chat.ollama_stop_tokens(spec.chat)
            gens = [generate_gguf(llm, _gguf_prompt(tok, spec, p), stops, spec.evaluation.max_new_tokens)
                    for p in URDU_PROMPTS]
            llm.close()
    except Exception as e:  # a variant that does not load or run fails its gate; the message says why
        row.update(loads=False, error=f"{type(e).__name__}: {e}".splitlines()[0][:300], stopped=False,
                   urdu_purity=0.0, passed=False, seconds=round(time.perf_counter() - start, 2))
        return row
    ev = spec.evaluation
    row["loads"] = True
    row["error"] = None
    row["stops"] = [g.reason for g in gens]
    row["stopped"] = all(g.reason != "length" for g in gens)
    row["urdu_purity"] = urdu_purity([g.text for g in gens])
    row["sample"] = gens[0].text[:160]
    fidelity_ok = t.reference or (t.gate is not None and row["kld_mean"] <= t.gate.max_kld
                                  and row["top1"] >= t.gate.min_top1)
    row["fidelity_passed"] = fidelity_ok
    row["min_urdu_purity"] = ev.min_urdu_purity
    row["purity_passed"] = row["urdu_purity"] >= ev.min_urdu_purity
    row["passed"] = (fidelity_ok and (row["stopped"] or not ev.enforce_stop_token)
                     and (row["purity_passed"] or not ev.enforce_urdu_purity))
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def verify(spec: Spec, models: dict[str, Path], progress: bool = True) -> dict:
    """The verification figures (the contract the publishing step reads; see ``run``)."""
    from transformers import AutoTokenizer

    from release.artifacts import sha256_file

    all_targets = targets(spec, models)
    flagship = next(t for t in all_targets if t.reference)
    ref = hf_logits(flagship.path, spec)
    tok = AutoTokenizer.from_pretrained(flagship.path)
    rows, artifacts = {}, {}
    items = all_targets
    if progress:
        from rich.progress import track

        items = track(all_targets, description="verify", transient=True)
    for t in items:
        missing = [p for p in weight_files(t) if not p.is_file()] or ([] if weight_files(t) else [t.path])
        if missing:
            raise VerifyError(f"{missing[0]}: not found; build the {t.variant} variant first")
        rows[t.key] = check(spec, t, ref, tok)
        for p in weight_files(t):
            rel = p.relative_to(spec.build_dir).as_posix() if p.is_relative_to(spec.build_dir) else p.as_posix()
            artifacts[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size, "variant": t.variant,
                              "quant": t.quant, "passed": rows[t.key]["passed"]}
    ev = spec.evaluation
    return {"passed": all(r["passed"] for r in rows.values()), "artifacts": artifacts, "variants": rows,
            "prompts": len(ref.ids), "enforced": {"urdu_purity": ev.enforce_urdu_purity,
                                                   "stop_token": ev.enforce_stop_token}}


def folder(spec: Spec) -> Path:
    return spec.build_dir / STAGE


def inputs(spec: Spec) -> dict[str, Path]:
    """Every variant's folder, by ``[variants]`` key (from the pipeline)."""
    from release import pipeline  # imported here: the pipeline imports the stages

    return pipeline.upstream(spec, STAGE)


def run(spec: Spec, *, force: bool = False, progress: bool = True) -> Manifest:
    """Stage ``verify``: every variant the spec publishes."""
    return run_on(spec, inputs(spec), force=force, progress=progress)


def run_on(spec: Spec, models: dict[str, Path], *, force: bool = False, progress: bool = True) -> Manifest:
    """Verify every variant in ``models`` (variant key -> folder) as a stage.

    The manifest's figures: ``passed`` (every enforced gate of every variant), ``artifacts``
    (weight file path relative to the build folder -> sha256, size, variant, quant, passed) and
    ``variants`` (key -> runtime, kld_mean, top1, max_kld, min_top1, urdu_purity, stopped,
    passed, ...). A failed gate is recorded, not raised: the manifest is the evidence; the
    pipeline and the publishing step refuse to go on.
    """
    from release.artifacts import run_stage, write_json

    def build(out: Path) -> dict:
        figures = verify(spec, models, progress)
        write_json(out / "verification.json", figures)
        return figures

    sections = {k: spec.section_hash(k) for k in ("chat", "inference", "evaluation", "gates", "variants")}
    return run_stage(STAGE, folder(spec), build, release=spec.release.name,
                     inputs={k: Path(v) for k, v in sorted(models.items())}, spec_sections=sections,
                     tools=("transformers", "llama-cpp-python", "bitsandbytes", "torch"), force=force)


def failures(figures: dict) -> list[str]:
    """One line per failed variant: which gate and by how much."""
    out = []
    enforced = figures.get("enforced", {})
    for key, r in figures.get("variants", {}).items():
        if r["passed"]:
            continue
        if not r.get("loads", True):
            out.append(f"{key}: does not load or generate ({r['error']})")
            continue
        why = []
        if not r["fidelity_passed"]:
            why.append(f"KLD {r['kld_mean']} (max {r['max_kld']}), top-1 {r['top1']} (min {r['min_top1']})"
                       if r["max_kld"] is not None else "no fidelity gate in the spec")
        if not r["stopped"] and enforced.get("stop_token"):
            why.append(f"did not stop at a stop token ({', '.join(r['stops'])})")
        if not r["purity_passed"] and enforced.get("urdu_purity"):
            why.append(f"Urdu purity {r['urdu_purity']:.3f} < {r['min_urdu_purity']}")
        out.append(f"{key}: " + "; ".join(why))
    return out


def summary_rows(figures: dict) -> list[tuple[str, ...]]:
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    return [(key, r["runtime"], num(r.get("kld_mean"), ".5f"), num(r.get("top1"), ".1%"),
             num(r.get("max_kld"), ".4f"), f"{r.get('urdu_purity', 0):.1%}",
             "yes" if r.get("stopped") else "no", "pass" if r["passed"] else "FAIL")
            for key, r in figures.get("variants", {}).items()]
