"""Verification: every variant loads in its runtime and generates with the release's template, and
its next-token distributions are measured against the BF16 model's.

GGUF files run in llama.cpp (llama-cpp-python). Generation follows Ollama's runner: greedy or
sampled tokens are turned into text *with* special tokens, the run ends at an end-of-generation
token, and stop strings are matched on the text (the text before the first stop is returned).
This is what makes a missing stop token visible: header tokens in the output.

Fidelity is measured once, here, on the spec's fixed evaluation text (``evaluation.fidelity_*``):
cut into chunks that run as separate sequences in both runtimes, scored at every position. The
BF16 reference and the other transformers variants are computed in float32 one decoder layer at
a time (``release/forward.py``); the reference's logits live in a memory-mapped temporary file,
and every variant is compared with them chunk by chunk as its own logits are produced, so memory
holds one chunk's logits, not all of them. Everything runs on ``forward.device()`` (the GPU when
there is one); llama.cpp uses every core, and the GPU when its build has one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from release.artifacts import Manifest, Traits, stage_dir
from release.errors import VerifyError
from release.spec import Gate, Spec


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: list[int]
    reason: str  # "eog" (end-of-generation token), "stop:<string>", or "length"


def cpu_threads() -> int:
    """The cores this process may run on (its affinity mask, which containers and taskset set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_gguf(path: Path, n_ctx: int = 512, vocab_only: bool = False, **kwargs):
    """A llama.cpp model on every core (and every layer on the GPU when llama.cpp was built with
    one), without the CPU backend's extra buffer types (weight repacking for AMX/AVX-512
    kernels): on CPUs that report AMX without the OS enabling its tile state (seen in virtual
    machines) those kernels crash on any quantized batch. Verification needs the numbers, not
    the speed."""
    import llama_cpp
    import llama_cpp.llama as llama_module

    defaults = llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    options = {"n_threads": cpu_threads(), "n_threads_batch": cpu_threads(),
               "n_gpu_layers": -1 if llama_cpp.llama_supports_gpu_offload() else 0, **kwargs}
    llama_module.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, vocab_only=vocab_only, verbose=False, seed=0,
                               **options)
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


# --- fidelity -----------------------------------------------------------------------------------


def text_chunks(spec: Spec, tok) -> list[list[int]]:
    """The evaluation text's tokens as ``evaluation.fidelity_chunks`` sequences of
    ``fidelity_chunk_tokens`` tokens each: BOS, then a stretch of the text. The stretches do not
    overlap and are spread evenly over the text, so every part of it (Urdu and English) is read."""
    ev = spec.evaluation
    path = spec.resolve(ev.fidelity_text)
    ids = tok(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    n, body = ev.fidelity_chunks, ev.fidelity_chunk_tokens - 1
    if len(ids) < n * body:
        raise VerifyError(f"{path}: {len(ids)} tokens; evaluation.fidelity_chunks = {n} chunks of "
                          f"{ev.fidelity_chunk_tokens} tokens need {n * body} (each chunk starts with BOS)")
    bos = tok.convert_tokens_to_ids(spec.chat.bos_token)
    starts = [round(i * (len(ids) - body) / max(n - 1, 1)) for i in range(n)]
    return [[bos, *ids[s:s + body]] for s in starts]


@dataclass(frozen=True)
class Reference:
    """The BF16 model's logits at every position of every chunk, computed in float32: a
    memory-mapped temporary file of [positions, vocab] float32, read back chunk by chunk."""

    chunks: list[list[int]]
    logits: object  # numpy.memmap [positions, vocab]
    tokens_per_s: float

    def chunk(self, i: int):
        """Chunk ``i``'s logits as a torch tensor viewing the file (nothing copied)."""
        import torch

        n = len(self.chunks[0])
        return torch.from_numpy(self.logits[i * n:(i + 1) * n])


@contextmanager
def reference(model_dir: Path, chunks: list[list[int]], device: str,
              workdir: Path | None = None) -> Iterator[Reference]:
    """The flagship's logits on ``chunks``, in a temporary folder under ``workdir`` (the system's
    temporary folder by default) that is deleted when the block ends."""
    import numpy as np

    from release import forward

    ckpt = forward.Checkpoint(model_dir)
    n = len(chunks[0])
    with tempfile.TemporaryDirectory(prefix="reference-", dir=workdir) as tmp:
        logits = np.memmap(Path(tmp) / "logits.f32", dtype=np.float32, mode="w+",
                           shape=(len(chunks) * n, ckpt.config.vocab_size))
        start = time.perf_counter()
        for i, out in forward.logits(ckpt, chunks, device):
            logits[i * n:(i + 1) * n] = out.cpu().numpy()
        rate = len(chunks) * n / (time.perf_counter() - start)
        # the file is unlinked when the block ends; its pages go with the last view of them
        yield Reference(chunks, logits, round(rate, 1))


class Fidelity:
    """Mean KL divergence KL(BF16 || variant) of the next-token distributions, the share of
    positions whose top token agrees, and the largest logit difference, accumulated chunk by
    chunk. Each chunk is compared in slices of ``ROWS`` positions, so the float32 temporaries
    stay at a few ROWS x vocab arrays."""

    ROWS = 128

    def __init__(self) -> None:
        self.kl, self.agree, self.positions, self.max_dlogit = 0.0, 0, 0, 0.0
        self.start = time.perf_counter()

    def add(self, ref, logits) -> None:
        import torch

        for r0 in range(0, logits.shape[0], self.ROWS):
            q = logits[r0:r0 + self.ROWS].float()
            p = ref[r0:r0 + self.ROWS].to(q.device)
            lp, lq = torch.log_softmax(p, dim=-1), torch.log_softmax(q, dim=-1)
            self.kl += float((lp.exp() * (lp - lq)).sum())
            self.agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
            self.positions += q.shape[0]
            self.max_dlogit = max(self.max_dlogit, float((q - p).abs().max()))

    def figures(self) -> dict:
        rate = self.positions / (time.perf_counter() - self.start)
        return {"kld_mean": round(self.kl / self.positions, 6), "top1": round(self.agree / self.positions, 4),
                "max_abs_dlogit": round(self.max_dlogit, 4), "positions": self.positions,
                "fidelity_tokens_per_s": round(rate, 1)}


def hf_fidelity(path: Path, ref: Reference, device: str) -> dict:
    """``Fidelity`` of a safetensors variant (BF16, FP16 or bitsandbytes 4-bit): its weights in
    float32 arithmetic, streamed a layer at a time like the reference: the format's loss, not
    a runtime's rounding."""
    from release import forward

    acc = Fidelity()
    for i, logits in forward.logits(forward.Checkpoint(path), ref.chunks, device):
        acc.add(ref.chunk(i), logits)
    return acc.figures()


def gguf_fidelity(path: Path, ref: Reference) -> dict:
    """``Fidelity`` of a GGUF file run by llama.cpp, each chunk a sequence of its own."""
    import torch

    n = len(ref.chunks[0])
    # float32 KV cache: measure the weights, not llama.cpp's default f16 cache
    llm = load_gguf(path, n_ctx=n, logits_all=True, type_k=0, type_v=0)
    try:
        acc = Fidelity()
        for i, ids in enumerate(ref.chunks):
            llm.reset()
            llm.eval(ids)
            acc.add(ref.chunk(i), torch.from_numpy(llm.scores[:n]))
        return acc.figures()
    finally:
        llm.close()


# --- Urdu purity ------------------------------------------------------------------------------

# Fixed prompts that every variant answers (``evaluation.generation_prompts`` of them, in this
# order): Urdu, the release's language; the first asks for a short answer.
URDU_PROMPTS = [
    "پاکستان کا دارالحکومت کون سا شہر ہے؟",
    "اردو زبان کی تاریخ مختصراً بیان کریں۔",
    "علامہ اقبال کی ایک مشہور نظم کا نام بتائیں اور اس کا مرکزی خیال لکھیں۔",
    "صحت مند رہنے کے لیے تین مشورے دیں۔",
    "پانی کیوں ضروری ہے؟",
    "کرکٹ کے بارے میں ایک جملہ لکھیں۔",
]


def urdu_purity(texts: list[str]) -> float:
    """Share of Urdu-script letters (release/urdu.py, as curation's script filter counts them)
    among all letters of ``texts`` (0.0 when there are none)."""
    from release import urdu

    counts = [urdu.count_letters(t) for t in texts]
    letters = sum(n for _, n in counts)
    return round(sum(u for u, _ in counts) / letters, 4) if letters else 0.0


def prompts(spec: Spec) -> list[str]:
    """The prompts each variant answers: the first ``evaluation.generation_prompts``."""
    n = spec.evaluation.generation_prompts
    if n > len(URDU_PROMPTS):
        raise VerifyError(f"{spec.path}: evaluation.generation_prompts: at most {len(URDU_PROMPTS)}, got {n}")
    return URDU_PROMPTS[:n]


# --- the verify stage -------------------------------------------------------------------------

STAGE = "verify"
TRAITS = Traits()
MODELFILES = "modelfiles"  # the input holding the Modelfiles (the other inputs are variant folders)


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


def _chat_ids(tok, spec: Spec, prompt: str) -> list[int]:
    from release import chat

    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], chat_template=chat.jinja_template(spec.chat),
                                  add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    return list(ids)


def _generate_hf(model, tok, spec: Spec, prompt: str) -> Generation:
    import torch
    from transformers import GenerationConfig

    from release import chat

    # the variant's own eos list (its generation_config.json), where transformers users' answers end
    eos = model.generation_config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else chat.eos_token_ids(spec.chat)
    ids = torch.tensor([_chat_ids(tok, spec, prompt)], device=model.device)
    # plain greedy, as llama.cpp decodes in generate_gguf: no repetition penalty from the model's
    # generation_config.json (that holds the users' sampling settings), so runtimes are compared alike
    config = GenerationConfig(max_new_tokens=spec.evaluation.max_new_tokens, do_sample=False, eos_token_id=eos,
                              pad_token_id=tok.convert_tokens_to_ids(spec.chat.pad_token), repetition_penalty=1.0)
    with torch.no_grad():
        new = model.generate(ids, attention_mask=torch.ones_like(ids),
                             generation_config=config)[0, ids.shape[1]:].tolist()
    stopped = bool(new) and new[-1] in eos
    text = tok.decode(new[:-1] if stopped else new, skip_special_tokens=False)
    return Generation(text, new, "eog" if stopped else "length")


def hf_model(path: Path, device: str):
    """A transformers variant loaded as its users load it, on ``device``: in its stored dtype
    (BF16, FP16; NF4 computing in its quantization config's dtype), so that on the CPU the
    weights stay the files' memory maps (file pages, not a float32 copy in anonymous memory)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map=device).eval()


def hf_generations(path: Path, tok, spec: Spec, device: str) -> tuple[list[Generation], float]:
    """Greedy answers of a transformers variant (``hf_model``) to the spec's prompts, and the
    seconds spent generating them (loading excluded)."""
    model = hf_model(path, device)
    try:
        start = time.perf_counter()
        return [_generate_hf(model, tok, spec, p) for p in prompts(spec)], time.perf_counter() - start
    finally:
        del model


def gguf_generations(path: Path, tok, spec: Spec) -> tuple[list[Generation], float]:
    """Greedy answers of a GGUF file in llama.cpp with the Modelfiles' stop strings, and the
    seconds spent generating them (loading excluded)."""
    from release import chat

    texts = [_gguf_prompt(tok, spec, p) for p in prompts(spec)]
    n_ctx = max(len(_chat_ids(tok, spec, p)) for p in prompts(spec)) + spec.evaluation.max_new_tokens + 8
    llm = load_gguf(path, n_ctx=n_ctx)
    try:
        stops = chat.ollama_stop_tokens(spec.chat)
        start = time.perf_counter()
        return ([generate_gguf(llm, text, stops, spec.evaluation.max_new_tokens) for text in texts],
                time.perf_counter() - start)
    finally:
        llm.close()


def _gguf_prompt(tok, spec: Spec, prompt: str) -> str:
    """The release's template rendered as text, without the BOS llama.cpp adds itself."""
    from release import chat

    text = tok.apply_chat_template([{"role": "user", "content": prompt}], chat_template=chat.jinja_template(spec.chat),
                                   add_generation_prompt=True, tokenize=False)
    return text.removeprefix(spec.chat.bos_token)


def problems(spec: Spec, t: Target, tok, modelfiles: Path | None) -> list[str]:
    """What the runtimes read besides the weights, against the spec (release/conformance.py)."""
    from release import conformance
    from release import modelfiles as mf

    if t.runtime == "transformers":
        from transformers import AutoTokenizer

        return conformance.hf_problems(spec, t.path, AutoTokenizer.from_pretrained(t.path))
    modelfile = modelfiles / mf.modelfile_name(spec, t.quant) if modelfiles is not None else None
    return conformance.gguf_problems(spec, t.path, t.quant, tok, modelfile)


def check(spec: Spec, t: Target, ref: Reference, tok, device: str, modelfiles: Path | None = None) -> dict:
    """Gates 1-3 for one target: loads and generates (stopping at a stop token), fidelity vs
    BF16 within the spec's gate, Urdu purity of greedy answers to Urdu prompts; with the
    tokens per second of its fidelity forward and of its generation."""
    start = time.perf_counter()
    row: dict = {"runtime": t.runtime, "variant": t.variant, "quant": t.quant,
                 "kld_mean": None, "top1": None, "max_abs_dlogit": None,
                 "max_kld": t.gate.max_kld if t.gate else None, "min_top1": t.gate.min_top1 if t.gate else None}
    try:
        if t.reference:
            row.update(positions=sum(map(len, ref.chunks)), fidelity_tokens_per_s=ref.tokens_per_s)
        elif t.runtime == "transformers":
            row.update(hf_fidelity(t.path, ref, device))
        else:
            row.update(gguf_fidelity(t.path, ref))
        gens, seconds = (hf_generations(t.path, tok, spec, device) if t.runtime == "transformers"
                         else gguf_generations(t.path, tok, spec))
        generated = sum(len(g.tokens) for g in gens)
        row.update(generated_tokens=generated, generation_tokens_per_s=round(generated / seconds, 2))
        found = problems(spec, t, tok, modelfiles)  # a file a runtime cannot read fails here, with its reason
    except Exception as e:  # noqa: BLE001  any failure of the variant under test is its failed gate, recorded with its type
        row.update(loads=False, error=f"{type(e).__name__}: {e}".splitlines()[0][:300], stopped=False,
                   urdu_purity=0.0, passed=False, seconds=round(time.perf_counter() - start, 2))
        return row
    row["loads"] = True
    row["error"] = None
    row["problems"] = found
    row["stops"] = [g.reason for g in gens]
    row["stopped_count"] = sum(g.reason != "length" for g in gens)
    row["urdu_purity"] = urdu_purity([g.text for g in gens])
    row["sample"] = gens[0].text[:160]
    row["seconds"] = round(time.perf_counter() - start, 2)
    return judge(spec, t, row)


def judge(spec: Spec, t: Target, row: dict) -> dict:
    """``row``'s gate results under the spec's gates and thresholds: the judgement, kept apart
    from the measurement so that changed gates re-judge stored figures (``run``)."""
    ev = spec.evaluation
    row["max_kld"], row["min_top1"] = (t.gate.max_kld, t.gate.min_top1) if t.gate else (None, None)
    if not row.get("loads", True):
        return row
    fidelity_ok = t.reference or (t.gate is not None and row["kld_mean"] <= t.gate.max_kld
                                  and row["top1"] >= t.gate.min_top1)
    row["fidelity_passed"] = fidelity_ok
    if "stopped_count" in row:  # (figures measured before the count have "stopped" alone)
        row["min_stopped"] = ev.min_stopped or len(row["stops"])
        row["stopped"] = row["stopped_count"] >= row["min_stopped"]
    row["min_urdu_purity"] = ev.min_urdu_purity
    row["purity_passed"] = row["urdu_purity"] >= ev.min_urdu_purity
    row["passed"] = (fidelity_ok and not row.get("problems") and (row["stopped"] or not ev.enforce_stop_token)
                     and (row["purity_passed"] or not ev.enforce_urdu_purity))
    return row


def verify(spec: Spec, models: dict[str, Path], progress: bool = True, workdir: Path | None = None) -> dict:
    """The verification figures (the contract the publishing step reads; see ``run``).
    ``workdir``: where the reference's temporary logits file goes (the system's temporary
    folder by default)."""
    from transformers import AutoTokenizer

    from release import forward
    from release.artifacts import recorded_sha256, sha256_file, track

    all_targets = targets(spec, models)
    asked = prompts(spec)  # asking for more prompts than there are fails here, once, not per variant
    for t in all_targets:
        missing = [p for p in weight_files(t) if not p.is_file()] or ([] if weight_files(t) else [t.path])
        if missing:
            raise VerifyError(f"{missing[0]}: not found; build the {t.variant} variant first")
    flagship = next(t for t in all_targets if t.reference)
    tok = AutoTokenizer.from_pretrained(flagship.path)
    chunks = text_chunks(spec, tok)
    device = forward.device()
    rows, artifacts = {}, {}
    with reference(flagship.path, chunks, device, workdir) as ref:
        for t in track(all_targets, progress, "verify"):
            rows[t.key] = check(spec, t, ref, tok, device, models.get(MODELFILES))
            for p in weight_files(t):
                rel = p.relative_to(spec.build_dir).as_posix() if p.is_relative_to(spec.build_dir) else p.as_posix()
                # the stage's manifest's digest while the file is as it wrote it (as skipping a stage trusts it)
                digest = recorded_sha256(p, spec.build_dir) or sha256_file(p)
                artifacts[rel] = {"sha256": digest, "size": p.stat().st_size, "variant": t.variant,
                                  "quant": t.quant, "passed": rows[t.key]["passed"]}
    fidelity = {"text": spec.evaluation.fidelity_text, "chunks": len(chunks), "chunk_tokens": len(chunks[0]),
                "positions": sum(map(len, chunks))}
    return _summed(spec, rows, artifacts, fidelity=fidelity, prompts=len(asked), device=device, threads=cpu_threads())


def _summed(spec: Spec, rows: dict, artifacts: dict, *, fidelity: dict, prompts: int, device: str,
            threads: int) -> dict:
    """The verification figures of judged ``rows`` (see ``run``)."""
    ev = spec.evaluation
    for a in artifacts.values():
        a["passed"] = rows[a["variant"] if a["quant"] is None else f"gguf:{a['quant']}"]["passed"]
    return {"passed": all(r["passed"] for r in rows.values()), "artifacts": artifacts, "variants": rows,
            "fidelity": fidelity,
            "generation": {"prompts": prompts, "max_new_tokens": ev.max_new_tokens},
            "device": device, "threads": threads,
            "enforced": {"urdu_purity": ev.enforce_urdu_purity, "stop_token": ev.enforce_stop_token}}


def run(spec: Spec, inputs: Mapping[str, Path], *, force: bool = False, progress: bool = True) -> Manifest:
    """Stage ``verify``: every variant in ``inputs`` (variant key -> the folder it is built in).

    The manifest's figures: ``passed`` (every enforced gate of every variant), ``artifacts``
    (weight file path relative to the build folder -> sha256, size, variant, quant, passed),
    ``variants`` (key -> runtime, kld_mean, top1, max_kld, min_top1, urdu_purity, stopped,
    passed, fidelity_tokens_per_s, generation_tokens_per_s, ...), and what was measured on
    (``fidelity``, ``generation``, ``device``, ``threads``). A failed gate is recorded, not
    raised: the manifest is the evidence; the pipeline and the publishing step refuse to go on.
    """
    from release.artifacts import fingerprint, input_digest, run_stage, tool_versions, write_json

    tools = ("transformers", "llama-cpp-python", "bitsandbytes", "torch")
    sections = {k: spec.section_hash(k) for k in ("chat", "inference", "evaluation", "gates", "variants")}
    models = dict(inputs)
    feeds = {k: Path(v) for k, v in sorted(models.items())}
    feeds["fidelity_text"] = spec.resolve(spec.evaluation.fidelity_text)
    # what the measurements depend on: everything but the gates and thresholds they are judged by
    measured = {k: v for k, v in sections.items() if k not in ("gates", "evaluation")}
    measured["evaluation"] = hashlib.sha256(json.dumps(
        {k: v for k, v in spec.raw.get("evaluation", {}).items() if k not in THRESHOLDS},
        sort_keys=True, default=str).encode()).hexdigest()
    key = fingerprint({k: input_digest(v) for k, v in feeds.items()}, measured, tool_versions(*tools))

    def build(out: Path) -> dict:
        figures = None if force else rejudged(spec, models, stage_dir(spec.build_dir, STAGE), key)
        if figures is None:  # --force measures again, as it says
            figures = verify(spec, models, progress, workdir=out)  # the reference's logits: deleted before the end
        figures["measured"] = key
        write_json(out / "verification.json", figures)
        return figures

    return run_stage(STAGE, stage_dir(spec.build_dir, STAGE), build, release=spec.release.name, inputs=feeds,
                     spec_sections=sections,
                     tools=tools, force=force)


# [evaluation] keys that judge the measurements rather than change them
THRESHOLDS = ("min_urdu_purity", "enforce_urdu_purity", "enforce_stop_token", "min_stopped")


def rejudged(spec: Spec, models: dict[str, Path], folder: Path, key: str) -> dict | None:
    """The last verification's figures judged again under the spec's current gates, when only
    gates or thresholds changed since (its ``measured`` key is ``key``): a stricter or looser
    gate needs no new measurement. None when something measured changed."""
    try:
        old = json.loads((folder / "verification.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(old, dict) or old.get("measured") != key:
        return None
    rows = old["variants"]
    all_targets = targets(spec, models)
    if {t.key for t in all_targets} != set(rows):
        return None
    for t in all_targets:
        judge(spec, t, rows[t.key])
    figures = _summed(spec, rows, old["artifacts"], fidelity=old["fidelity"], prompts=old["generation"]["prompts"],
                      device=old["device"], threads=old["threads"])
    figures["rejudged"] = True
    return figures


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
            why.append(f"stopped at a stop token in {r.get('stopped_count', 0)} of {len(r['stops'])} answers "
                       f"(min {r.get('min_stopped', len(r['stops']))}: {', '.join(r['stops'])})")
        if not r["purity_passed"] and enforced.get("urdu_purity"):
            why.append(f"Urdu purity {r['urdu_purity']:.3f} < {r['min_urdu_purity']}")
        why += r.get("problems", [])
        out.append(f"{key}: " + "; ".join(why))
    return out


# The gates a spec may leave informational, and the key that enforces each.
OPTIONAL_GATES = {"urdu_purity": "evaluation.enforce_urdu_purity", "stop_token": "evaluation.enforce_stop_token"}


def informational(figures: dict) -> list[str]:
    """The optional gates this verification measured but did not enforce (as its spec said)."""
    enforced = figures.get("enforced", {})
    return [g for g in OPTIONAL_GATES if enforced.get(g) is False]


def gate_cell(text: str, gate: str, figures: dict) -> str:
    """A table cell for an optional gate's figure: marked "(info)" when the gate is not enforced,
    so that a "pass" beside it is not read as that figure passing."""
    return f"{text} (info)" if gate in informational(figures) else text


def info_note(figures: dict) -> str | None:
    """The caption that explains "(info)" in a table of these figures; None when every gate is
    enforced."""
    gates = informational(figures)
    if not gates:
        return None
    return ("(info): measured, not a release gate for this spec (" + ", ".join(f"{OPTIONAL_GATES[g]} = false"
                                                                          for g in gates)
            + "); pass/FAIL counts only the enforced gates")


def stopped_cell(r: dict) -> str:
    """``5/6``: answers that ended at a stop token, of those asked (``yes``/``no`` for figures
    measured before the count was kept)."""
    if "stopped_count" in r and r.get("stops") is not None:
        return f"{r['stopped_count']}/{len(r['stops'])}"
    return "yes" if r.get("stopped") else "no"


def summary_rows(figures: dict) -> list[tuple[str, ...]]:
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    return [(key, r["runtime"], num(r.get("kld_mean"), "z.5f"), num(r.get("top1"), ".1%"),
             num(r.get("max_kld"), "z.4f"), gate_cell(f"{r.get('urdu_purity', 0):.1%}", "urdu_purity", figures),
             gate_cell(stopped_cell(r), "stop_token", figures), "pass" if r["passed"] else "FAIL")
            for key, r in figures.get("variants", {}).items()]
