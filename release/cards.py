"""Model cards: one per published repo, with the metadata that builds the Hub's model tree.

The flagship BF16 repo is a ``finetune`` of the base model; the FP16, bitsandbytes 4-bit and GGUF
repos are ``quantized`` versions of the flagship. Everything in a card comes from the spec and,
where a stage has run, from its manifest (file sizes, sha256, fidelity figures). A value the
model's own card does not state (``[provenance.not_on_card]``) is marked as such wherever it is
printed. Next to each card the stage writes the licence's NOTICE and, for the GGUF repo, the
size/fidelity chart (release/chart.py); the publish stage publishes the whole folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from release import chart, chat, llama3, shards, signing
from release.artifacts import MANIFEST, Manifest, Traits, read_manifest, run_stage, stage_dir
from release.spec import Corpus, Spec, Variant

STAGE = "cards"
TRAITS = Traits()
VARIANT = "variant:"  # inputs key prefix of the variants' folders

LIBRARY = {"safetensors": "transformers", "bnb-4bit": "transformers", "gguf": "gguf"}


def card_data(spec: Spec, name: str) -> ModelCardData:
    """YAML metadata of the card of variant ``name``."""
    v = spec.variants[name]
    flagship = v is spec.flagship
    r = spec.release
    tags = list(r.tags) + {"bnb-4bit": ["bitsandbytes", "4-bit", "nf4"],
                           "gguf": ["gguf", "llama.cpp", "ollama"]}.get(v.format, [])
    # the authors' scores are of the flagship: a quantized repo's own fidelity is in its body
    results = eval_results(spec) if flagship else []
    return ModelCardData(
        language=list(r.languages),
        license=r.license,
        license_name=r.license_name,
        license_link=r.license_link,
        library_name=LIBRARY[v.format],
        pipeline_tag="text-generation",
        tags=tags,
        datasets=spec.datasets or None,
        base_model=spec.base.model if flagship else spec.flagship.repo,
        base_model_relation="finetune" if flagship else "quantized",
        model_name=r.name if results else None,
        eval_results=results or None,
    )


def eval_results(spec: Spec) -> list[EvalResult]:
    """The model-index entries: the scores the authors report (``[evaluation]``), not verified
    by the Hub, with their source (``[provenance]``)."""
    ev, src = spec.evaluation, spec.provenance
    scores = [("overall_score", "Overall score", ev.overall_score),
              ("urdu_purity", "Urdu purity (%)", None if ev.urdu_purity is None else round(100 * ev.urdu_purity, 2))]
    return [EvalResult(task_type="text-generation", task_name="Text generation", dataset_type=ev.benchmark,
                       dataset_name=ev.benchmark, metric_type=key, metric_name=label, metric_value=value,
                       verified=False, source_name=src.source_name, source_url=src.source_url)
            for key, label, value in scores if value is not None]


def stated(spec: Spec, key: str, text: str) -> str:
    """``text`` (the printed value of spec key ``key``), marked when the model's card does not
    state that value."""
    why = spec.not_on_card(key)
    return text if why is None else f"{text} (not stated by the authors; {why})"


def render(spec: Spec, name: str, gguf_manifest: Manifest | None = None,
           verify_manifest: Manifest | None = None, parameters: int | None = None,
           folders: Mapping[str, Path] | None = None) -> ModelCard:
    """The card of variant ``name`` (a key of ``[variants]``). With the verification manifest the
    variants table lists every verified weight file with its figures; ``parameters`` (the
    flagship's weight count) gives bits/weight of the safetensors variants; ``folders`` (variant
    key -> the folder it is built in) turns build paths into paths in the repos."""
    v = spec.variants[name]
    text = f"---\n{card_data(spec, name).to_yaml()}\n---\n\n" + _body(spec, name, v, gguf_manifest,
                                                                       verify_manifest, parameters, folders or {})
    return ModelCard(text)


def _body(spec: Spec, name: str, v: Variant, gguf_manifest: Manifest | None,
          verify_manifest: Manifest | None, parameters: int | None, folders: Mapping[str, Path]) -> str:
    lines = [*_intro(spec, v), *_evaluation(spec, v), *_training_data(spec), *_training(spec), *_prompt(spec)]
    if verify_manifest is not None:
        lines += _verified_variants(spec, verify_manifest, gguf_manifest, parameters, folders)
        if v.format == "gguf" and chart.points(spec, verify_manifest):
            lines += [f"![File size against mean KL divergence from BF16, per quant type]({chart.FILE})", "",
                      "Each quantized file's size against its mean KL divergence from BF16 (the table above): "
                      "further down is closer to BF16, further left is smaller.", ""]
    else:
        lines += _variants(spec, gguf_manifest)
    return "\n".join(lines + _imatrix(spec, v, gguf_manifest) + _usage(spec, v) + _verify(spec, v.repo, v.format)
                     + _license(spec) + _citation(spec))


def signer_of(key: object) -> str:
    """What the cards say signed the release: a key's fingerprint, ``sigstore``, or ``unsigned``."""
    if isinstance(key, signing.Key):
        return key.fingerprint
    return "sigstore" if isinstance(key, signing.Keyless) else "unsigned"


def _verify(spec: Spec, repo: str, fmt: str, signer: str | None = None) -> list[str]:
    """How a downloader checks the files: this toolchain's ``./inv check`` and plain model_signing."""
    signer = signer or signer_of(signing.from_environment())
    tag, name = spec.hub.revision_tag, repo.split("/")[-1]
    lines = ["## Verify this release", "",
             f"`{signing.PROVENANCE}` is an [in-toto](https://in-toto.io) statement with "
             "[SLSA provenance](https://slsa.dev/provenance/v1): the weight files of this repository with their "
             "sha256, "
             "and everything they were built from (the base model's files, the LoRA adapters"
             + (f" (published in {', '.join(spec.adapter_repos().values())})" if spec.adapter_repos() else "")
             + ", the release spec, the curated data and the calibration text), each by its sha256.", ""]
    if signer == "unsigned":
        return lines + ["This release was published without a signature.", ""]
    if signer == "sigstore":
        lines += [f"Every file is signed with [OpenSSF model signing](https://github.com/sigstore/model-transparency) "
                  f"(`{signing.SIGNATURE}`), keylessly through Sigstore: the signature names the maintainers' "
                  "identity, which `--identity` and `--identity_provider` must match.", ""]
        return lines
    single = fmt == "gguf"
    lines += [f"Every file is signed with [OpenSSF model signing](https://github.com/sigstore/model-transparency): "
              f"`{signing.SIGNATURE}` covers every file of the repository"
              + (", and each GGUF file has its own `<file>.sig`, so one quant type can be checked alone" if single
                 else "") + f". The public key is `{signing.PUBLIC_KEY}`; its fingerprint is", "",
              f"    {signer}", "",
              f"(`sha256sum {signing.PUBLIC_KEY}`). Compare it with the fingerprint the maintainers publish outside "
              "the Hub: a key that comes with the files only shows that they have not changed since whoever holds it "
              "signed them.", "",
              "With the release toolchain (the signature, every file's sha256, and the provenance against the "
              "adapter repositories):", "", "```bash",
              f"./inv check {repo} --revision {tag} --key {signing.PUBLIC_KEY}", "```", "",
              "With model_signing alone (`pip install model-signing==1.1.1 pyopenssl`), on a download of the whole "
              "repository:", "", "```bash",
              f"hf download {repo} --revision {tag} --local-dir {name}",
              f"model_signing verify key {name} --signature {name}/{signing.SIGNATURE} "
              f"--public_key {signing.PUBLIC_KEY}",
              "```", ""]
    if single:
        q = spec.gguf_file_name(default_quant(spec))
        lines += ["One GGUF file alone:", "", "```bash",
                  f"hf download {repo} {q} {q}{signing.FILE_SIGNATURE} --revision {tag} --local-dir {name}",
                  f"model_signing verify key {name}/{q} --signature {name}/{q}{signing.FILE_SIGNATURE} "
                  f"--public_key {signing.PUBLIC_KEY}", "```", ""]
    return lines + ["In the Hugging Face cache (`hf download` without `--local-dir`) the files are symlinks: add "
                    "`--allow_symlinks` to `model_signing verify`.", ""]


# --- adapter repos ------------------------------------------------------------------------------

ADAPTER_ABOUT = {"cpt": "continued pre-training on Urdu and English text", "sft": "instruction fine-tuning"}


def adapter_card(spec: Spec, stage: str) -> ModelCard:
    """The card of a published LoRA adapter (``hub.publish_adapters``): an ``adapter`` of the base
    in the model tree; how to apply it with PEFT; how to check it."""
    repo = spec.adapter_repos()[stage]
    r, lora, st = spec.release, spec.lora, getattr(spec.training, stage)
    data = ModelCardData(language=list(r.languages), license=r.license, license_name=r.license_name,
                         license_link=r.license_link, library_name="peft", pipeline_tag="text-generation",
                         tags=[*r.tags, "lora", "peft"], datasets=spec.datasets or None,
                         base_model=spec.base.model, base_model_relation="adapter")
    cpt = spec.adapter_repos()["cpt"]
    chain = ([f'model = PeftModel.from_pretrained(model, "{cpt}").merge_and_unload()  # continued pre-training first']
             if stage == "sft" else [])
    body = [f"# {repo.split('/')[-1]}", "",
            f"The LoRA adapter of {r.name}'s {ADAPTER_ABOUT[stage]} stage, on {spec.base.model}."
            + (f" It was trained on the base with the continued pre-training adapter ([{cpt}](https://huggingface.co/"
               f"{cpt})) merged in, and applies on top of it." if stage == "sft" else "")
            + f" Merged, the adapters make [{spec.flagship.repo}](https://huggingface.co/{spec.flagship.repo}).", "",
            "| | |", "|---|---|",
            f"| LoRA | r = {lora.r}, alpha = {lora.alpha}, targets {', '.join(lora.target_modules)} |",
            f"| trained in full | {', '.join(st.modules_to_save) or '-'} |",
            f"| data | {st.description} |", f"| learning rate | {st.learning_rate:g}, {st.lr_scheduler} |", "",
            "## Usage", "", "```python", "import torch",
            "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
            f'model = AutoModelForCausalLM.from_pretrained("{spec.base.model}", torch_dtype=torch.bfloat16)',
            *chain, f'model = PeftModel.from_pretrained(model, "{repo}").merge_and_unload()', "```", "",
            *_verify(spec, repo, "adapter"), *_license(spec)]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def _imatrix(spec: Spec, v: Variant, gguf_manifest: Manifest | None) -> list[str]:
    """Which GGUF files an importance matrix guided, and on what text (the gguf stage's figures)."""
    figures = gguf_manifest.figures if gguf_manifest else {}
    im, files = figures.get("imatrix"), figures.get("files", {})
    if v.format != "gguf" or im is None:
        return []
    built = [q for q in spec.gguf_types() if q in files]  # the spec's order (a manifest's keys are sorted)
    used = [q for q in built if files[q].get("imatrix")]
    plain = [q for q in built if not files[q].get("imatrix")]
    about = v.imatrix.description if v.imatrix and v.imatrix.description else "calibration text"
    return ["## Importance matrix", "",
            f"{', '.join(used)} were quantized with an importance matrix (`{im['file']}`), computed by llama.cpp's "
            f"`llama-imatrix` from the {v.dtype} file over `{im['calibration']}` of the release toolchain: {about}; "
            f"{im['chunks']} chunks of {im['chunk_tokens']} tokens ({im['tokens']:,} tokens)."
            + (f" {', '.join(plain)} did not use it." if plain else ""), ""]


def _intro(spec: Spec, v: Variant) -> list[str]:
    """Title, what the repo holds, and the model and LoRA table."""
    r, lora, t = spec.release, spec.lora, spec.training
    what = {"safetensors": f"{v.dtype} safetensors", "bnb-4bit": f"bitsandbytes 4-bit ({v.dtype}, double quantization: "
            f"{v.double_quant}, compute {v.compute_dtype})", "gguf": "GGUF files for llama.cpp and Ollama"}[v.format]
    return [
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
        f"| sequence length | {stated(spec, 'training.sequence_length', str(t.sequence_length))} |",
        f"| LoRA | r = {stated(spec, 'lora.r', str(lora.r))}, alpha = {stated(spec, 'lora.alpha', str(lora.alpha))}, "
        f"dropout {stated(spec, 'lora.dropout', str(lora.dropout))}, "
        f"rsLoRA {stated(spec, 'lora.use_rslora', str(lora.use_rslora))} |",
        f"| LoRA targets | {stated(spec, 'lora.target_modules', ', '.join(lora.target_modules))} |",
        f"| license | {r.license_name} ({r.license_link}) |",
        "",
    ]


def _evaluation(spec: Spec, v: Variant) -> list[str]:
    """The authors' reported scores, kept apart from this release's own measurements."""
    ev, src = spec.evaluation, spec.provenance
    rows = [(label, stated(spec, f"evaluation.{key}", text)) for key, label, text in (
        ("overall_score", "overall score", None if ev.overall_score is None else f"{ev.overall_score:g}"),
        ("urdu_purity", "Urdu purity", None if ev.urdu_purity is None else f"{100 * ev.urdu_purity:.2f}%"),
    ) if text is not None]
    if not rows:
        return []
    of = "this model" if v is spec.flagship else f"the BF16 model ({spec.flagship.repo})"
    return ["## Evaluation", "",
            f"Reported by the authors for {of} ([{src.source_name}]({src.source_url})); not measured by this "
            "release:", "", "| metric | reported score |", "|---|---|",
            *(f"| {label} | {value} |" for label, value in rows), "",
            "This release's own measurements, each file against the BF16 model, are in the variants table below.", ""]


def _tokens(n: int) -> str:
    """1_840_000_000 -> '1.84B', 140_000_000 -> '140M'."""
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n:,}"


def _dataset(c: Corpus) -> str:
    """A dataset's name, linked to the Hub where the spec gives its id."""
    return f"[{c.name}](https://huggingface.co/datasets/{c.hub_id})" if c.hub_id else c.name


def _sources(names: list[str]) -> str:
    return f": {', '.join(names)}" if names else ""


def _training_data(spec: Spec) -> list[str]:
    """What each training stage read, from ``[data]``."""
    d = spec.data
    urdu = f"{stated(spec, 'data.urdu_tokens', _tokens(d.urdu_tokens))} tokens" + _sources(d.urdu_sources)
    english = (f"{stated(spec, 'data.english_tokens', _tokens(d.english_tokens))} tokens ("
               f"{100 * d.replay_share:.1f}% of the total)" + _sources(d.english_sources))
    linked = [_dataset(c) for c in d.corpora if c.hub_id]
    return ["## Training data", "", "| | |", "|---|---|",
            f"| continued pre-training, Urdu | {urdu} |",
            f"| continued pre-training, English | {english} |",
            *([f"| continued pre-training datasets | {', '.join(linked)} |"] if linked else []),
            f"| cleaning | {stated(spec, 'data.retained_fraction', f'{100 * d.retained_fraction:.1f}%')} of the raw "
            "corpus kept |",
            f"| instruction fine-tuning | {_dataset(d.instruct)} |", ""]


def _training(spec: Spec) -> list[str]:
    """Both training stages side by side; each value marked where the model's card does not state it."""
    t = spec.training
    lines = ["## Training", "", "| | continued pre-training | instruction fine-tuning |", "|---|---|---|"]

    def row(label: str, field: str, show=str) -> str:
        a, b = (stated(spec, f"training.{s}.{field}", show(getattr(getattr(t, s), field))) for s in ("cpt", "sft"))
        return f"| {label} | {a} | {b} |"

    def schedule(s: str) -> str:
        st = getattr(t, s)
        return (f"{stated(spec, f'training.{s}.lr_scheduler', st.lr_scheduler)}, warmup ratio "
                f"{stated(spec, f'training.{s}.warmup_ratio', f'{st.warmup_ratio:g}')}")

    lines += [row("data", "description"), row("optimizer", "optimizer"),
              row("learning rate", "learning_rate", lambda x: f"{x:g}"),
              f"| schedule | {schedule('cpt')} | {schedule('sft')} |",
              row("effective batch size", "effective_batch_size"), row("epochs", "epochs"),
              row("trained in full", "modules_to_save", lambda x: ", ".join(x) or "-"), row("format", "format")]
    return lines + ["", f"Precision {t.precision}, gradient checkpointing {t.gradient_checkpointing}, "
                    f"on {t.hardware}.", ""]


def _prompt(spec: Spec) -> list[str]:
    """The exact prompt format, the recommended sampling and the context window."""
    inf = spec.inference
    stops = ", ".join(f"`{s}`" for s in spec.chat.stop_tokens)
    num_ctx = stated(spec, "ollama.num_ctx", f"{spec.ollama.num_ctx} tokens")
    return [
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
        f"(eos ids {chat.eos_token_ids(spec.chat)}).",
        "",
        f"Context window of the Ollama Modelfiles and the llama.cpp commands below: {num_ctx}. Fine-tuning used "
        f"{spec.training.sequence_length}-token sequences; a longer window costs more memory for the KV cache.",
        "",
    ]


def _license(spec: Spec) -> list[str]:
    """The base's licence and its duties, from the spec: link, attribution, use policy, NOTICE."""
    r, terms = spec.release, spec.license_terms
    lines = ["## License", "", f"{r.license_name}: {r.license_link}."
             + (f" {terms.attribution}." if terms.attribution else "") + " The text is in the LICENSE file.", ""]
    if terms.use_policy:
        lines += [f"Use of this model must follow the Acceptable Use Policy: {terms.use_policy}", ""]
    return lines + [f"The NOTICE file carries the licence's attribution notice: \"{terms.notice}\"", ""]


def _citation(spec: Spec) -> list[str]:
    r = spec.release
    key = "".join(ch for ch in f"{r.basename}{r.version}" if ch.isalnum()).lower()
    return ["## Citation", "", "```bibtex", f"@misc{{{key},",
            f"  title = {{{{{r.name}}}: {r.size_label} Urdu-first chat model fine-tuned from {spec.base.model}}},",
            f"  author = {{{r.organization}}},", f"  howpublished = {{\\url{{https://huggingface.co/{spec.flagship.repo}}}}},",
            f"  note = {{version {r.version}}}", "}", "```", ""]


def _repo_path(spec: Spec, rel: str, folder: Path | None) -> str:
    """A weight file's build path (relative to the build folder) as its path in its repo:
    relative to ``folder``, the folder its variant is built in."""
    path = spec.build_dir / rel
    return path.relative_to(folder).as_posix() if folder is not None and path.is_relative_to(folder) else rel


def _verified_variants(spec: Spec, vm: Manifest, gguf_manifest: Manifest | None, parameters: int | None,
                       folders: Mapping[str, Path]) -> list[str]:
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
            kl, top1 = f"{f['kld_mean']:z.4f}", f"{100 * f['top1']:.1f}%"
        quant = q or {"bfloat16": "BF16", "float16": "FP16"}.get(v.dtype, f"bitsandbytes {v.dtype.upper()}")
        out.append(f"| {v.repo} | `{_repo_path(spec, rel, folders.get(a['variant']))}` | {quant} | {_size(a['size'])} "
                   f"| {bpw} | `{a['sha256'][:16]}…` | {kl} | {top1} |")
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
                    out.append(f"| {v.repo} | GGUF {q} | `{f['file']}` | {f['bytes'] / 1e9:.2f} GB "
                               f"| {f['bits_per_weight']:.2f} | `{f['sha256'][:16]}…` |")
                else:
                    out.append(f"| {v.repo} | GGUF {q} | `{spec.gguf_file_name(q)}` | | | |")
        else:
            out.append(f"| {v.repo} | {v.format} {v.dtype} | safetensors | | | |")
    return out + [""]


QUESTION = "پاکستان کا دارالحکومت کون سا شہر ہے؟"  # "Which city is the capital of Pakistan?"


def default_quant(spec: Spec) -> str:
    """The GGUF type of the Ollama default tag: the one the usage examples name."""
    return next(q for q, tag in spec.ollama.tags.items() if tag == spec.ollama.default_tag)


def _usage(spec: Spec, v: Variant) -> list[str]:
    if v.format == "gguf":
        return ["## Usage", "", *_usage_llama_cpp(spec, v), *_usage_ollama(spec, v)]
    inf = spec.inference
    extra = ", bitsandbytes" if v.format == "bnb-4bit" else ""
    return [
        "## Usage", "",
        f"Needs transformers {llama3.COMPATIBLE_TRANSFORMERS} or later (Llama 3.1's rope scaling) and accelerate "
        f"(for `device_map`): `pip install \"transformers>={llama3.COMPATIBLE_TRANSFORMERS}\" accelerate{extra}`.",
        "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model_id = "{v.repo}"',
        "tokenizer = AutoTokenizer.from_pretrained(model_id)",
        'model = AutoModelForCausalLM.from_pretrained(model_id, torch_dtype="auto", device_map="auto")',
        f'messages = [{{"role": "user", "content": "{QUESTION}"}}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",",
        "                                       return_dict=True).to(model.device)",
        f"out = model.generate(**inputs, max_new_tokens={inf.max_new_tokens}, do_sample={inf.do_sample}, "
        f"temperature={inf.temperature},",
        f"                     top_p={inf.top_p}, repetition_penalty={inf.repetition_penalty}, "
        f"eos_token_id={chat.eos_token_ids(spec.chat)})",
        'print(tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```", "",
    ]


def _usage_llama_cpp(spec: Spec, v: Variant) -> list[str]:
    """llama-cli, llama-server and llama-cpp-python, all formatting with the GGUF's own template."""
    inf, q, n_ctx = spec.inference, default_quant(spec), spec.ollama.num_ctx
    sampling = f"--temp {inf.temperature} --top-p {inf.top_p} --repeat-penalty {inf.repetition_penalty}"
    request = json.dumps({"messages": [{"role": "user", "content": QUESTION}], "max_tokens": inf.max_new_tokens,
                          "temperature": inf.temperature, "top_p": inf.top_p,
                          "repeat_penalty": inf.repetition_penalty}, ensure_ascii=False)
    return [
        "llama.cpp. `--jinja` formats the chat with the template stored in the GGUF file, which adds the default "
        "Urdu system prompt; without it llama.cpp uses its built-in Llama 3 format and the system prompt is lost:",
        "", "```bash",
        f"llama-cli -hf {v.repo}:{q} --jinja -cnv -c {n_ctx} -n {inf.max_new_tokens} {sampling}",
        "```", "",
        "As an OpenAI-compatible server:", "", "```bash",
        f"llama-server -hf {v.repo}:{q} --jinja -c {n_ctx} --port 8080",
        f"curl http://localhost:8080/v1/chat/completions -H \"Content-Type: application/json\" -d '{request}'",
        "```", "",
        "From Python with llama-cpp-python (`pip install llama-cpp-python huggingface_hub`), which also formats "
        "with the GGUF file's template:", "", "```python",
        "from llama_cpp import Llama",
        "",
        f'llm = Llama.from_pretrained("{v.repo}", filename="{spec.gguf_file_name(q)}", n_ctx={n_ctx}, verbose=False)',
        f'out = llm.create_chat_completion([{{"role": "user", "content": "{QUESTION}"}}], '
        f"max_tokens={inf.max_new_tokens},",
        f"                                 temperature={inf.temperature}, top_p={inf.top_p}, "
        f"repeat_penalty={inf.repetition_penalty})",
        'print(out["choices"][0]["message"]["content"])',
        "```", "",
    ]


def _usage_ollama(spec: Spec, v: Variant) -> list[str]:
    """``ollama run hf.co/...`` and a local ``ollama create`` from the repo's Modelfile."""
    q, model = default_quant(spec), spec.ollama.model
    tag = spec.ollama.tags[q]
    return [
        "Ollama, from the Hub (uses this repo's `template`, `system` and `params`):", "", "```bash",
        f"ollama run hf.co/{v.repo}:{q}", "```", "",
        "Ollama, from a local copy: download the GGUF file with its Modelfile, then create the model:", "", "```bash",
        f"hf download {v.repo} {spec.gguf_file_name(q)} {spec.modelfile_name(q)} --local-dir {model}",
        f"cd {model}",
        f"ollama create {model}:{tag} -f {spec.modelfile_name(q)}", f"ollama run {model}:{tag}",
        "```", "",
        "Every quant type has its Modelfile in this repo: "
        + ", ".join(f"`{spec.modelfile_name(t)}`" for t in spec.gguf_types()) + ".",
        "",
    ]


def write_all(spec: Spec, out_dir: Path, gguf_manifest: Manifest | None = None,
              verify_manifest: Manifest | None = None, parameters: int | None = None,
              folders: Mapping[str, Path] | None = None) -> list[Path]:
    """Each variant's repo documents in ``<out_dir>/<variant>/``: README.md (the card), NOTICE
    (the licence's attribution notice) and, for the GGUF repo with a verification, the chart the
    card links. Returns every file written."""
    from release.artifacts import atomic_path, write_text

    written = []
    key = signing.from_environment()
    for name in [*spec.variants, *spec.adapter_repos()]:
        folder = Path(out_dir) / name
        card = (render(spec, name, gguf_manifest, verify_manifest, parameters, folders) if name in spec.variants
                else adapter_card(spec, name))
        write_text(folder / "README.md", str(card))
        write_text(folder / "NOTICE", spec.license_terms.notice + "\n")
        written += [folder / "README.md", folder / "NOTICE"]
        if isinstance(key, signing.Key):  # the public key, in every repo
            write_text(folder / signing.PUBLIC_KEY, key.public_pem.decode())
            written.append(folder / signing.PUBLIC_KEY)
        if name not in spec.variants:
            continue
        v = spec.variants[name]
        png = chart.chart(spec, verify_manifest) if v.format == "gguf" else None
        if png is not None:
            with atomic_path(folder / chart.FILE) as tmp:
                tmp.write_bytes(png)
            written.append(folder / chart.FILE)
    return written


def run(spec: Spec, inputs: Mapping[str, Path], *, force: bool = False, progress: bool = True) -> Manifest:
    """Stage ``cards``: ``cards/<variant>/`` (README.md, NOTICE, the GGUF chart) from the spec and
    the manifests it finds. ``inputs``: the ``verify`` and ``gguf`` stages' folders, the flagship
    ``model`` and each variant's folder as ``variant:<key>``. The manifests of verify and gguf
    are its inputs whichever exist (their figures are what the cards show; the cards are rebuilt
    when they change): cards can be written before either."""
    found = {k: inputs[k] / MANIFEST for k in ("verify", "gguf") if (inputs[k] / MANIFEST).is_file()}
    model = inputs["model"]
    folders = {k.removeprefix(VARIANT): Path(p) for k, p in inputs.items() if k.startswith(VARIANT)}
    sections = {k: spec.section_hash(k) for k in ("release", "base", "lora", "training", "data", "chat", "inference",
                                                   "evaluation", "variants", "ollama", "license_terms", "provenance",
                                                   "hub")}
    sections["signing"] = signer_of(signing.from_environment())  # a new key rewrites the cards

    def build(out: Path) -> dict:
        manifests = {k: read_manifest(p.parent) for k, p in found.items()}
        write_all(spec, out, manifests.get("gguf"), manifests.get("verify"), shards.count_parameters(model), folders)
        return {"cards": len(spec.variants) + len(spec.adapter_repos()), "verified": "verify" in found}

    return run_stage(STAGE, stage_dir(spec.build_dir, STAGE), build, release=spec.release.name, inputs=found,
                     spec_sections=sections, tools=("huggingface_hub", "matplotlib"), force=force)
