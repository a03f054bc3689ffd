"""Model cards: one per published repo, with the metadata that builds the Hub's model tree.

The flagship BF16 repo is a ``finetune`` of the base model; the FP16, bitsandbytes 4-bit and GGUF
repos are ``quantized`` versions of the flagship. Everything in a card comes from the spec and,
where a stage has run, from its manifest (file sizes, sha256, fidelity figures).
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from release import chat, shards
from release.artifacts import MANIFEST, Manifest, read_manifest, run_stage
from release.spec import Spec, Variant

STAGE = "cards"

LIBRARY = {"safetensors": "transformers", "bnb-4bit": "transformers", "gguf": "gguf"}


def card_data(spec: Spec, name: str) -> ModelCardData:
    """YAML metadata of the card of variant ``name``."""
    v = spec.variants[name]
    flagship = v is spec.flagship
    r = spec.release
    tags = list(r.tags) + {"bnb-4bit": ["bitsandbytes", "4-bit", "nf4"], "gguf": ["gguf", "llama.cpp", "ollama"]}.get(v.format, [])
    return ModelCardData(
        language=list(r.languages),
        license=r.license,
        license_name=r.license_name,
        license_link=r.license_link,
        library_name=LIBRARY[v.format],
        pipeline_tag="text-generation",
        tags=tags,
        datasets=[d for d in r.datasets if "/" in d] or None,
        base_model=spec.base.model if flagship else spec.flagship.repo,
        base_model_relation="finetune" if flagship else "quantized",
    )


def render(spec: Spec, name: str, gguf_manifest: Manifest | None = None,
           verify_manifest: Manifest | None = None, parameters: int | None = None) -> ModelCard:
    """The card of variant ``name`` (a key of ``[variants]``). With the verification manifest the
    variants table lists every verified weight file with its figures; ``parameters`` (the
    flagship's weight count) gives bits/weight of the safetensors variants."""
    v = spec.variants[name]
    text = f"---\n{card_data(spec, name).to_yaml()}\n---\n\n" + _body(spec, name, v, gguf_manifest,
                                                                       verify_manifest, parameters)
    return ModelCard(text)


def _body(spec: Spec, name: str, v: Variant, gguf_manifest: Manifest | None,
          verify_manifest: Manifest | None = None, parameters: int | None = None) -> str:
    r, lora, t = spec.release, spec.lora, spec.training
    inf = spec.inference
    stops = ", ".join(f"`{s}`" for s in spec.chat.stop_tokens)
    eos = chat.eos_token_ids(spec.chat)
    what = {"safetensors": f"{v.dtype} safetensors", "bnb-4bit": f"bitsandbytes 4-bit ({v.dtype}, double quantization: "
            f"{v.double_quant}, compute {v.compute_dtype})", "gguf": "GGUF files for llama.cpp and Ollama"}[v.format]
    lines = [
        f"# {v.repo.split('/')[-1]}",
        "",
        f"{r.name} is an Urdu-first chat model: {spec.base.model} ({spec.base.parameters}) with continued "
        f"pre-training on Urdu and English text, then instruction fine-tuning, both with LoRA. "
        f"This repository holds the {what}"
        + ("." if v is spec.flagship else f" of [{spec.flagship.repo}](https://huggingface.co/{spec.flagship.repo})."),
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| base model | [{spec.base.model}](https://huggingface.co/{spec.base.model}) |",
        f"| architecture | {spec.base.architecture} |",
        f"| languages | {', '.join(r.languages)} |",
        f"| sequence length | {t.sequence_length} |",
        f"| LoRA | r = {lora.r}, alpha = {lora.alpha}, dropout {lora.dropout}, rsLoRA {lora.use_rslora} |",
        f"| LoRA targets | {', '.join(lora.target_modules)} |",
        f"| license | {r.license_name} ({r.license_link}) |",
        "",
        "## Training",
        "",
        "| | continued pre-training | instruction fine-tuning |",
        "|---|---|---|",
    ]
    cpt, sft = t.cpt, t.sft
    for label, a, b in [
        ("data", cpt.description, sft.description),
        ("optimizer", cpt.optimizer, sft.optimizer),
        ("learning rate", f"{cpt.learning_rate:g} ({cpt.lr_scheduler}, warmup {cpt.warmup_ratio:g})",
         f"{sft.learning_rate:g} ({sft.lr_scheduler}, warmup {sft.warmup_ratio:g})"),
        ("effective batch size", cpt.effective_batch_size, sft.effective_batch_size),
        ("epochs", cpt.epochs, sft.epochs),
        ("trained in full", ", ".join(cpt.modules_to_save) or "-", ", ".join(sft.modules_to_save) or "-"),
        ("format", cpt.format, sft.format),
    ]:
        lines.append(f"| {label} | {a} | {b} |")
    lines += [
        "",
        f"Precision {t.precision}, gradient checkpointing {t.gradient_checkpointing}, on {t.hardware}.",
        "",
        "## Prompt format",
        "",
        "Llama 3 chat format. Without a system message the default Urdu system prompt is used:",
        "",
        "```",
        chat.render(spec.chat, [{"role": "user", "content": "{user_message}"}]),
        "```",
        "",
        "## Recommended inference",
        "",
        f"max_new_tokens {inf.max_new_tokens}, temperature {inf.temperature}, top_p {inf.top_p}, "
        f"repetition_penalty {inf.repetition_penalty}, do_sample {str(inf.do_sample).lower()}. Stop at {stops} "
        f"(eos ids {eos}).",
        "",
    ]
    if verify_manifest is not None:
        lines += _verified_variants(spec, verify_manifest, gguf_manifest, parameters)
    else:
        lines += _variants(spec, gguf_manifest)
    lines += _usage(spec, v)
    lines += ["## License", "", f"{r.license_name}: {r.license_link}. Built with Llama.", ""]
    lines += _citation(spec)
    return "\n".join(lines)


def _citation(spec: Spec) -> list[str]:
    r = spec.release
    key = "".join(ch for ch in f"{r.basename}{r.version}" if ch.isalnum()).lower()
    return ["## Citation", "", "```bibtex", f"@misc{{{key},",
            f"  title = {{{{{r.name}}}: {r.size_label} Urdu-first chat model fine-tuned from {spec.base.model}}},",
            f"  author = {{{r.organization}}},", f"  howpublished = {{\\url{{https://huggingface.co/{spec.flagship.repo}}}}},",
            f"  note = {{version {r.version}}}", "}", "```", ""]


def _repo_path(spec: Spec, rel: str, variant: str) -> str:
    """A weight file's build path (relative to the build folder) as its path in the repo of
    ``variant``: relative to the folder the pipeline builds that variant in."""
    from release import pipeline  # imported here: the pipeline imports the stages

    path, folder = spec.build_dir / rel, pipeline.variant_dir(spec, variant)
    return path.relative_to(folder).as_posix() if path.is_relative_to(folder) else rel


def _verified_variants(spec: Spec, vm: Manifest, gguf_manifest: Manifest | None, parameters: int | None) -> list[str]:
    """One row per verified weight file: the verification manifest's sizes, sha256 and figures."""
    out = ["## Variants", "",
           "Every file below was loaded in its runtime and compared with the BF16 model on fixed Urdu and English "
           "prompts (mean KL divergence of the next-token distributions, share of positions with the same top-1 "
           "token).", "",
           "| repo | file | quant | size | bits/weight | sha256 | KL vs BF16 | same top-1 |",
           "|---|---|---|---|---|---|---|---|"]
    arts = vm.figures.get("artifacts", {})
    figs = vm.figures.get("variants", {})
    gguf_files = gguf_manifest.figures.get("files", {}) if gguf_manifest else {}
    order = list(spec.variants)
    for rel, a in sorted(arts.items(), key=lambda kv: (order.index(kv[1]["variant"]) if kv[1]["variant"] in order
                                                       else len(order), kv[0])):
        v = spec.variants.get(a["variant"])
        if v is None:
            continue
        q = a.get("quant")
        key = f"gguf:{q}" if q else a["variant"]
        f = figs.get(key, {})
        if q and q in gguf_files:
            bpw = f"{gguf_files[q]['bits_per_weight']:.2f}"
        elif parameters:
            total = sum(x["size"] for x in arts.values() if x["variant"] == a["variant"] and not x.get("quant"))
            bpw = f"{8 * total / parameters:.2f}"
        else:
            bpw = ""
        if f.get("kld_mean") is None:
            kl, top1 = ("reference", "reference") if v is spec.flagship else ("", "")
        else:
            kl, top1 = f"{f['kld_mean']:.4f}", f"{100 * f['top1']:.1f}%"
        quant = q or {"bfloat16": "BF16", "float16": "FP16"}.get(v.dtype, f"bitsandbytes {v.dtype.upper()}")
        out.append(f"| {v.repo} | `{_repo_path(spec, rel, a['variant'])}` | {quant} | {_size(a['size'])} | {bpw} "
                   f"| `{a['sha256'][:16]}…` | {kl} | {top1} |")
    return out + [""]


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _variants(spec: Spec, gguf_manifest: Manifest | None) -> list[str]:
    out = ["## Variants", "", "| repo | format | files | size | bits/weight | sha256 |", "|---|---|---|---|---|---|"]
    files = (gguf_manifest.figures.get("files", {}) if gguf_manifest else {})
    for v in spec.variants.values():
        if v.format == "gguf":
            for q in [v.dtype, *v.quant_types]:
                f = files.get(q)
                if f:
                    out.append(f"| {v.repo} | GGUF {q} | `{f['file']}` | {f['bytes'] / 1e9:.2f} GB | {f['bits_per_weight']:.2f} "
                               f"| `{f['sha256'][:16]}…` |")
                else:
                    out.append(f"| {v.repo} | GGUF {q} | `{spec.gguf_file_name(q)}` | | | |")
        else:
            out.append(f"| {v.repo} | {v.format} {v.dtype} | safetensors | | | |")
    return out + [""]


def _usage(spec: Spec, v: Variant) -> list[str]:
    inf = spec.inference
    eos = chat.eos_token_ids(spec.chat)
    if v.format == "gguf":
        q = v.quant_types[-1] if v.quant_types else v.dtype
        tag = spec.ollama.tags[q]
        return [
            "## Usage", "",
            "llama.cpp:", "", "```bash",
            f"llama-cli -hf {v.repo}:{q} -cnv --temp {inf.temperature} --top-p {inf.top_p} "
            f"--repeat-penalty {inf.repetition_penalty} -n {inf.max_new_tokens}",
            "```", "",
            "Ollama, from the Hub (uses this repo's `template`, `system` and `params`):", "", "```bash",
            f"ollama run hf.co/{v.repo}:{q}", "```", "",
            "Ollama, with the Modelfile next to the downloaded GGUF file:", "", "```bash",
            f"ollama create {spec.ollama.model}:{tag} -f {tag}.Modelfile", f"ollama run {spec.ollama.model}:{tag}",
            "```", "",
        ]
    extra = ""
    if v.format == "bnb-4bit":
        extra = "  # bitsandbytes 4-bit: needs `pip install bitsandbytes`"
    return [
        "## Usage", "", "```python",
        "import torch",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model_id = "{v.repo}"{extra}',
        "tokenizer = AutoTokenizer.from_pretrained(model_id)",
        'model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto", device_map="auto")',
        'messages = [{"role": "user", "content": "پاکستان کا دارالحکومت کون سا شہر ہے؟"}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",",
        "                                       return_dict=True).to(model.device)",
        f"out = model.generate(**inputs, max_new_tokens={inf.max_new_tokens}, do_sample={inf.do_sample}, "
        f"temperature={inf.temperature},",
        f"                     top_p={inf.top_p}, repetition_penalty={inf.repetition_penalty}, eos_token_id={eos})",
        'print(tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```", "",
    ]


def write_all(spec: Spec, out_dir: Path, gguf_manifest: Manifest | None = None,
              verify_manifest: Manifest | None = None, parameters: int | None = None) -> list[Path]:
    """``<out_dir>/<variant>/README.md`` for every variant."""
    from release.artifacts import write_text

    written = []
    for name in spec.variants:
        path = Path(out_dir) / name / "README.md"
        write_text(path, str(render(spec, name, gguf_manifest, verify_manifest, parameters)))
        written.append(path)
    return written


def folder(spec: Spec) -> Path:
    return spec.build_dir / STAGE


def inputs(spec: Spec) -> dict[str, Path]:
    """The manifests of the verify and gguf stages, whichever exist (their figures are what the
    cards show; the cards are rebuilt when they change). Cards can be written before either."""
    from release import pipeline  # imported here: the pipeline imports the stages

    feeds = pipeline.upstream(spec, STAGE)
    return {k: feeds[k] / MANIFEST for k in ("verify", "gguf") if (feeds[k] / MANIFEST).is_file()}


def run(spec: Spec, *, force: bool = False, progress: bool = True) -> Manifest:
    """Stage ``cards``: ``cards/<variant>/README.md`` from the spec and the manifests it finds."""
    from release import pipeline  # imported here: the pipeline imports the stages

    found = inputs(spec)
    model = pipeline.upstream(spec, STAGE)["model"]
    sections = {k: spec.section_hash(k) for k in ("release", "base", "lora", "training", "chat", "inference",
                                                   "variants", "ollama")}

    def build(out: Path) -> dict:
        manifests = {k: read_manifest(p.parent) for k, p in found.items()}
        written = write_all(spec, out, manifests.get("gguf"), manifests.get("verify"),
                            shards.count_parameters(model))
        return {"cards": len(written), "verified": "verify" in found}

    return run_stage(STAGE, folder(spec), build, release=spec.release.name, inputs=found,
                     spec_sections=sections, tools=("huggingface_hub",), force=force)
