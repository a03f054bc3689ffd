"""The training loop of stages ``cpt`` and ``sft`` (training/cpt.py, training/sft.py): LoRA
training with Unsloth -> PEFT adapters.

- ``cpt`` (continued pre-training): the base model, raw text from ``data/cpt.jsonl`` packed into
  blocks of ``training.sequence_length`` tokens (each document ``<|begin_of_text|> text
  <|end_of_text|>``, concatenated, cut into full blocks); LoRA on the spec's projections plus
  ``embed_tokens``/``lm_head`` trained in full (Unsloth's CPT recipe) with their own learning rate
  (``UnslothTrainer``'s ``embedding_learning_rate``).
- ``sft`` (instruction fine-tuning): the base with the CPT adapter merged (PEFT
  ``merge_and_unload``, weights rounded to BF16: bit for bit what ``release/merge.py`` writes when
  it chains ``[cpt, sft]``), chats from ``data/sft.jsonl`` rendered with the release's chat
  template, loss on assistant turns only (``train_on_responses_only`` with Llama 3's headers).

Each writes ``build/<release>/<stage>/``: ``adapter_config.json`` + ``adapter_model.safetensors``
(``base_model_name_or_path`` is the spec's ``base.model``), ``trainer_state.json`` (log history;
entries that depend on wall clock or on a resume removed, so that it is reproducible), ``train.log`` and the manifest.

Resume: trainer checkpoints live outside the stage folder (``run_stage`` rebuilds that from
scratch) in ``build/<release>/.checkpoints/<stage>-<fingerprint>``: a run that was killed resumes
from its last checkpoint; a changed input or spec section has another fingerprint and starts
fresh. Training is seeded (LoRA init, data order, dropout), so an interrupted and resumed run
gives the same adapter bytes as an uninterrupted one on the same machine.

Many processes (training/distributed.py): under torchrun every rank runs ``run``; rank 0 decides
whether the stage is up to date and tells the others, prepares the shared inputs first, and alone
writes checkpoints, the adapter, the log and the manifest. The global batch is the spec's.

Hardware: ``adapt`` is the one place where the spec's options meet this machine (on a host
without a GPU Unsloth runs through its CPU fallback). Every change it makes is written to the run
log and to the manifest's ``adaptations``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from release import chat, llama3, quiet
from release.artifacts import (
    Manifest,
    fingerprint,
    input_digest,
    read_manifest,
    run_stage,
    sha256_file,
    stage_dir,
    summary_console,
    tool_versions,
    write_json,
    write_text,
)
from release.errors import StageError
from release.spec import Spec
from training import distributed

STAGES = ("cpt", "sft")
DATA = "data"
TOOLS = ("torch", "transformers", "trl", "peft", "unsloth", "unsloth-zoo", "datasets", "accelerate")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Llama 3 turn headers: the instruction and response markers for train_on_responses_only.
USER_HEADER = f"{chat.HEADER_START}user{chat.HEADER_END}\n\n"
ASSISTANT_HEADER = f"{chat.HEADER_START}assistant{chat.HEADER_END}\n\n"
# log_history keys left out of trainer_state.json so that it is the same for a resumed run: wall-clock
# measurements (they go to train.log and the manifest), TRL's token counter and the final mean
# loss (both count only the steps run since the last start; the per-step losses are all kept).
VOLATILE_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "num_tokens", "train_loss")


def checkpoints_root(spec: Spec) -> Path:
    return spec.build_dir / ".checkpoints"


def _sections(spec: Spec, stage: str) -> dict[str, str]:
    keys = ["base.model", "lora", "training.sequence_length", "training.precision",
            "training.gradient_checkpointing", "training.seed", "training.save_steps", f"training.{stage}"]
    if stage == "sft":
        keys.append("chat")
    return {k: spec.section_hash(k) for k in keys}


# --- hardware adaptations ---------------------------------------------------------------------


def adapt(spec: Spec, stage: str, *, gpu: bool | None = None,
          bf16_native: bool | None = None) -> tuple[dict, list[str]]:
    """The spec's training options as this machine can run them: ``(settings, adaptations)``,
    one line per option changed and why. The only place where training options are changed."""
    import torch

    st = getattr(spec.training, stage)
    gpu = torch.cuda.is_available() if gpu is None else gpu
    precision = spec.training.precision
    settings = {
        "optim": st.optimizer,
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "load_dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision],
        "gradient_checkpointing": "unsloth" if spec.training.gradient_checkpointing else False,
    }
    notes: list[str] = []
    if gpu:
        return settings, notes
    if bf16_native is None:
        from unsloth_zoo.cpu import cpu_bf16_supported

        bf16_native = cpu_bf16_supported()
    notes.append("no GPU: Unsloth's CPU fallback (FastCPUModel: transformers + PEFT + TRL on CPU)")
    if "8bit" in st.optimizer or "paged" in st.optimizer:
        settings["optim"] = "adamw_torch_fused"
        notes.append(f"optimizer {st.optimizer} -> adamw_torch_fused: bitsandbytes' 8-bit optimizer states "
                     "need a GPU; same AdamW update with 32-bit states")
    if precision in ("bf16", "fp16"):
        settings["load_dtype"] = "float32"
        if precision == "bf16" and bf16_native:
            notes.append("bf16 -> float32 weights with bf16 autocast: the CPU has native bf16 (AMX/AVX512-BF16) "
                         "for the matmuls; weights and fully trained modules stay float32 so small updates are kept")
        else:
            settings["bf16"] = settings["fp16"] = False
            notes.append(f"{precision} -> float32: this CPU has no native {precision} (emulated {precision} is "
                         "several times slower than float32)")
    if settings["gradient_checkpointing"] == "unsloth":
        notes.append("gradient checkpointing 'unsloth' (offload to host RAM) -> plain recomputation: "
                     "on CPU the activations already live in RAM")
    return settings, notes


# --- data -------------------------------------------------------------------------------------


def _curated(inputs: Mapping[str, Path], name: str) -> Path:
    path = inputs[DATA] / name
    if not path.is_file():
        raise StageError(f"{path}: missing; run the data stage first (./inv data)")
    return path


# --- training ---------------------------------------------------------------------------------


class _Log:
    """The run log: every line to ``train.log`` and, when wanted, the console (rank 0's only:
    the other ranks' ``path`` is None and they do not echo)."""

    def __init__(self, path: Path | None, echo: bool):
        self.path, self.echo = path, echo and path is not None
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
        if self.echo:
            print(f"[train] {line}")


def train(spec: Spec, stage: str, inputs: Mapping[str, Path], out: Path | None, work: Path, *,
          progress: bool = True) -> dict:
    """Train one stage from ``inputs`` into ``out`` (adapter, trainer state, log); checkpoints go
    to ``work``. Returns the manifest figures. Ranks other than 0 train and write nothing (``out``
    None)."""
    work.mkdir(parents=True, exist_ok=True)
    # The run log lives beside the checkpoints, so a resumed run's log keeps the interrupted
    # attempt's lines too; it is copied into the stage folder at the end.
    log = _Log(work / "train.log" if out is not None else None, progress)
    log(f"--- start {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    start = time.perf_counter()
    fast_model = _import_unsloth(spec, work)
    import torch

    st = getattr(spec.training, stage)
    settings, notes = adapt(spec, stage)
    log(f"stage {stage}: {st.description}")
    for note in notes:
        log(f"adaptation: {note}")
    model, tokenizer, trainable = _peft_model(fast_model, spec, stage, inputs, settings, work, log)
    with distributed.rank0_first():
        dataset, tokens = _dataset(spec, stage, inputs, tokenizer, work, log)
    args = _plan(spec, stage, settings, work, len(dataset), progress, log)
    trainer, tokens, label_tokens = _trainer(spec, stage, model, tokenizer, dataset, args, tokens, log)
    _bar_only(trainer)
    resume = _last_checkpoint(work / "trainer", log)
    if resume:
        log(f"resuming from {resume.name}")
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if out is None:
        return {}
    history = _save(spec, trainer, out, work)

    losses = [e["loss"] for e in history if "loss" in e]
    seconds = round(time.perf_counter() - start, 2)
    figures = {
        "stage": stage,
        "steps": trainer.state.global_step,
        "epochs": st.epochs,
        "examples": len(dataset),
        "tokens": tokens,
        "label_tokens": label_tokens,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "mean_loss": sum(losses) / len(losses) if losses else None,
        "trainable_parameters": trainable,
        "seconds": seconds,
        "train_seconds": round(result.metrics.get("train_runtime", 0.0), 2),
        "resumed_from": resume.name if resume else None,
        "optimizer": str(getattr(args.optim, "value", args.optim)),
        "bf16": bool(args.bf16),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "processes": args.world_size,
        "threads": torch.get_num_threads(),
        "adaptations": notes,
    }
    log(f"done: {figures['steps']} steps, loss {figures['first_loss']} -> {figures['last_loss']}, {seconds} s")
    shutil.copyfile(work / "train.log", out / "train.log")
    return figures


def _import_unsloth(spec: Spec, work: Path):
    """Unsloth's ``FastLanguageModel``. Unsloth patches transformers/TRL/PEFT when imported first,
    and writes its compiled-code cache into the working directory: keep that in the work folder."""
    # one cache per local rank: the ranks of a host would otherwise write the same files at once
    rank = distributed.world()[1]
    cache = "unsloth_compiled_cache" + (f"-rank{rank}" if distributed.world()[2] > 1 else "")
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", str(checkpoints_root(spec) / cache))
    cwd = os.getcwd()
    os.chdir(work)
    try:
        quiet.import_unsloth()  # must come before transformers, trl, peft (quiet.py: when that is void)
        from unsloth import FastLanguageModel
    finally:
        os.chdir(cwd)
    return FastLanguageModel


def _peft_model(fast_model, spec: Spec, stage: str, inputs: Mapping[str, Path], settings: dict, work: Path,
                log) -> tuple:
    """``(model, tokenizer, trainable parameters)``: the stage's starting model (the base for CPT,
    base + CPT adapter for SFT) with fresh LoRA adapters from the spec."""
    import torch

    st = getattr(spec.training, stage)
    with distributed.rank0_first():
        model_dir = inputs["base"] if stage == "cpt" else _merged_cpt_model(inputs, work, log)
    placement = {}
    if torch.cuda.is_available() and distributed.world()[2] > 1:  # DDP: each rank's copy on its own GPU
        placement["device_map"] = {"": f"cuda:{distributed.world()[1]}"}
    model, tokenizer = fast_model.from_pretrained(
        model_name=str(model_dir), max_seq_length=spec.training.sequence_length,
        dtype=getattr(torch, settings["load_dtype"]), load_in_4bit=False,
        use_gradient_checkpointing=settings["gradient_checkpointing"], **placement)
    targets = list(spec.lora.target_modules) + list(st.modules_to_save)
    model = fast_model.get_peft_model(
        model, r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
        target_modules=targets, use_rslora=spec.lora.use_rslora, bias="none",
        use_gradient_checkpointing=settings["gradient_checkpointing"], random_state=spec.training.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
        + (f"; the spec says about {spec.lora.trainable_parameters:,}" if spec.lora.trainable_parameters else ""))
    return model, tokenizer, trainable


def _dataset(spec: Spec, stage: str, inputs: Mapping[str, Path], tokenizer, work: Path, log) -> tuple:
    """``(dataset, tokens)``: CPT's blocks of token ids (and their token count), or SFT's chats
    with the release's chat template set on ``tokenizer`` (tokens counted once tokenized). Both
    are Arrow files in ``work/data``, memory-mapped (training/pack.py)."""
    from training import pack, tokens

    st = getattr(spec.training, stage)
    length = spec.training.sequence_length
    if stage == "sft":
        tokenizer.chat_template = chat.jinja_template(spec.chat)
        dataset = pack.sft_chats(_curated(inputs, "sft.jsonl"), work / "data")
        log(f"examples: {len(dataset)}")
        return dataset, None
    counter = tokens.counter(inputs["base"] / "tokenizer.json")
    dataset, f = pack.pack_cpt(_curated(inputs, "cpt.jsonl"), counter, length, work / "data",
                               bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, packing=st.packing)
    if not len(dataset):
        raise StageError(f"{inputs[DATA] / 'cpt.jsonl'}: fewer than {length} "
                         "tokens of text; add data or lower training.sequence_length")
    log(f"examples: {len(dataset)}" + (f" blocks of {length} tokens ({f['dropped']} tokens "
                                         "past the last full block dropped)" if st.packing else "")
        + f"; tokenized with {counter.engine}")
    return dataset, f["tokens"]


def _plan(spec: Spec, stage: str, settings: dict, work: Path, examples: int, progress: bool, log):
    """The trainer arguments, with the batch and schedule they give written to the log. The
    global batch is the spec's whatever the process count (training/distributed.py)."""
    st = getattr(spec.training, stage)
    processes = distributed.world()[2]
    device, accumulation = distributed.batch(st.effective_batch_size, st.per_device_batch_size, processes)
    steps_per_epoch = math.ceil(examples / st.effective_batch_size)
    args = _arguments(spec, stage, settings, work / "trainer", device, accumulation, progress)
    log(f"batch {device} x {accumulation} accumulation" + (f" x {processes} processes" if processes > 1 else "")
        + f" = {st.effective_batch_size}; {st.epochs} epoch(s), {steps_per_epoch} step(s) per epoch; "
        f"lr {st.learning_rate} {st.lr_scheduler}, warmup {st.warmup_ratio}; optimizer {args.optim}; "
        f"bf16 {args.bf16}; seed {spec.training.seed}")
    return args


def _trainer(spec: Spec, stage: str, model, tokenizer, dataset, args, tokens: int | None, log) -> tuple:
    """``(trainer, tokens, label_tokens)``: UnslothTrainer for CPT (every token is a label), TRL's
    SFTTrainer for SFT, with the loss on assistant turns only when the spec says so."""
    st = getattr(spec.training, stage)
    callbacks = [_log_lines(log), _mark_complete()]
    if stage == "cpt":
        from unsloth import UnslothTrainer

        trainer = UnslothTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=args,
                                 callbacks=callbacks)
        return trainer, tokens, tokens
    from trl import SFTTrainer
    from unsloth.chat_templates import train_on_responses_only

    from training import pack

    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=args,
                         callbacks=callbacks)
    if not st.train_on_responses_only:
        tokens = pack.column_tokens(trainer.train_dataset)
        return trainer, tokens, tokens
    trainer = train_on_responses_only(trainer, instruction_part=USER_HEADER, response_part=ASSISTANT_HEADER)
    tokens = pack.column_tokens(trainer.train_dataset)
    label_tokens = pack.column_tokens(trainer.train_dataset, "labels", ignore=-100)
    log(f"loss on assistant turns only: {label_tokens} of {tokens} tokens carry labels")
    return trainer, tokens, label_tokens


def _log_lines(log):
    """A trainer callback that writes each logged step to the run log."""
    from transformers import TrainerCallback

    class LogLines(TrainerCallback):
        def on_log(self, _args, state, _control, logs=None, **kwargs):
            if logs:
                log(f"step {state.global_step}: " + ", ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}"
                                                              for k, v in logs.items()))

    return LogLines()


COMPLETE = "checkpoint-complete"


def _mark_complete():
    """A trainer callback that marks a checkpoint complete once every rank has written its part
    (rank 0 the model, optimizer and state; every rank its RNG state, with no barrier between
    them in the Trainer): ``_last_checkpoint`` resumes only from a marked one."""
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        def on_save(self, args, state, _control, **kwargs):
            distributed.barrier()
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                files = {f.relative_to(folder).as_posix(): {"size": f.stat().st_size, "sha256": sha256_file(f)}
                         for f in sorted(folder.rglob("*")) if f.is_file() and f.name != COMPLETE}
                write_text(folder / COMPLETE, json.dumps(files, indent=1, sort_keys=True) + "\n")

    return MarkComplete()


def _bar_only(trainer) -> None:
    """The trainer's progress bar also prints every step's figures as a dict (and without a bar,
    its printer prints only those); the run log's ``step N:`` lines (``_log_lines``) already
    carry them, so the bar keeps only the bar."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class Bar(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    trainer.pop_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(Bar())


def _save(spec: Spec, trainer, out: Path, work: Path) -> list[dict]:
    """Write the adapter and the trainer state into ``out``, reproducibly; returns the log
    history kept (``VOLATILE_KEYS`` left out)."""
    trainer.model.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)  # PEFT's placeholder card; cards come from release/cards.py
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = spec.base.model  # the Hub id, not this machine's folder
    # PEFT keeps these as sets, written in hash order (PYTHONHASHSEED): sort, so the file is reproducible
    for key in ("target_modules", "modules_to_save"):
        if isinstance(cfg.get(key), list):
            cfg[key] = sorted(cfg[key])
    write_json(cfg_path, cfg)
    history = [{k: v for k, v in e.items() if k not in VOLATILE_KEYS} for e in trainer.state.log_history]
    trainer.state.save_to_json(str(work / "trainer_state.json"))
    state = json.loads((work / "trainer_state.json").read_text(encoding="utf-8"))
    state["log_history"] = history
    write_text(out / "trainer_state.json", json.dumps(state, indent=2, sort_keys=True) + "\n")
    return history


def _arguments(spec: Spec, stage: str, settings: dict, output_dir: Path, device_batch: int, accumulation: int,
               progress: bool):
    import torch

    st = getattr(spec.training, stage)
    ddp = {}
    if distributed.world()[2] > 1:
        # the process group is already up (distributed.init); LoRA leaves no parameter unused
        ddp = dict(ddp_backend="nccl" if torch.cuda.is_available() else "gloo", ddp_find_unused_parameters=False)
    common = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=device_batch,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=st.epochs,
        max_steps=st.max_steps if st.max_steps is not None else -1,
        learning_rate=st.learning_rate,
        lr_scheduler_type=st.lr_scheduler,
        warmup_steps=st.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the steps
        optim=settings["optim"],
        bf16=settings["bf16"],
        fp16=settings["fp16"],
        weight_decay=0.0,
        seed=spec.training.seed,
        data_seed=spec.training.seed,
        logging_steps=1,
        save_strategy="steps",
        save_steps=spec.training.save_steps,
        save_total_limit=2,
        report_to="none",
        disable_tqdm=not progress,
        max_length=spec.training.sequence_length,
        dataset_num_proc=None,
        # gradient checkpointing is Unsloth's (get_peft_model), not the trainer's
        **ddp,
    )
    if stage == "cpt":
        from unsloth import UnslothTrainingArguments

        return UnslothTrainingArguments(embedding_learning_rate=st.embedding_learning_rate, **common)
    from trl import SFTConfig

    return SFTConfig(**common)


def _last_checkpoint(folder: Path, log=None) -> Path | None:
    """The newest intact trainer checkpoint: marked complete (``_mark_complete``) and every file
    with the size and sha256 the mark records. One cut short by a kill has no mark; one damaged
    later (a truncated or changed file) is skipped, said in the log, for the one before it."""
    def intact(p: Path) -> bool:
        if not p.name.split("-")[-1].isdigit():
            return False
        try:
            files = json.loads((p / COMPLETE).read_text(encoding="utf-8"))
            damaged = [name for name, f in files.items() if not (p / name).is_file()
                       or (p / name).stat().st_size != f["size"] or sha256_file(p / name) != f["sha256"]]
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return False  # no mark (cut short) or an unreadable one
        if damaged and log is not None:
            log(f"{p.name} is damaged ({', '.join(damaged[:3])} changed since it was saved); not resuming from it")
        return not damaged

    for p in sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])
                    if p.name.split("-")[-1].isdigit() else -1, reverse=True):
        if intact(p):
            return p
    return None


def _merged_cpt_model(inputs: Mapping[str, Path], work: Path, log) -> Path:
    """The model SFT trains on: base + CPT adapter via PEFT ``merge_and_unload``, rounded to BF16
    (what release/merge.py writes for the first adapter of the chain). Kept in the work folder."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = work / "cpt-merged"
    if (folder / "done").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    cpt = inputs["cpt"]
    missing = [f for f in ADAPTER_FILES if not (cpt / f).is_file()]
    if missing:
        raise StageError(f"{cpt / missing[0]}: missing; run the cpt stage first (./inv train --stage cpt)")
    src = inputs["base"]
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, device_map="cpu")
    model = PeftModel.from_pretrained(model, str(cpt)).merge_and_unload()
    model = model.to(torch.bfloat16)
    model.save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, folder / name)
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    write_json(folder / "config.json", llama3.compatible_config(cfg, "bfloat16", cfg.get("eos_token_id")))
    (folder / "done").write_text("ok\n")
    log(f"base + CPT adapter merged (PEFT merge_and_unload, rounded to BF16) into {folder}")
    return folder


# --- the stage --------------------------------------------------------------------------------


def current(spec: Spec, stage: str, inputs: Mapping[str, Path]) -> Manifest | None:
    """The stage's manifest when it is up to date with ``inputs`` and the spec (``run`` would
    skip it), else None."""
    from release.artifacts import current as up_to_date

    return up_to_date(stage_dir(spec.build_dir, stage), inputs={k: Path(v) for k, v in inputs.items()},
                      spec_sections=_sections(spec, stage), tools=TOOLS)


def run(spec: Spec, stage: str, inputs: Mapping[str, Path], *, force: bool = False,
        progress: bool = True) -> Manifest:
    """Stage ``cpt`` or ``sft`` from ``inputs``: ``base`` (the base model's folder), ``data`` (the
    data stage's) and for SFT ``cpt`` (the CPT adapter). Skipped when those and the spec's
    training facts are unchanged; resumes an interrupted run."""
    if stage not in STAGES:
        raise StageError(f"--stage {stage}: unknown training stage (expected one of {', '.join(STAGES)})")
    inputs = {k: Path(v) for k, v in inputs.items()}
    sections = _sections(spec, stage)
    key = fingerprint({k: input_digest(v) for k, v in inputs.items()}, sections, tool_versions(*TOOLS))
    work = checkpoints_root(spec) / f"{stage}-{key[:16]}"
    distributed.init()
    distributed.agree({"checkout": distributed.checkout(), "spec file": sha256_file(spec.path),
                       "environment": fingerprint({}, {"python": sys.version}, tool_versions(*TOOLS)), "inputs": key})
    if distributed.world()[0] != 0:  # another rank: train if rank 0 builds, write nothing
        if distributed.share(False):
            train(spec, stage, inputs, None, work, progress=False)
        distributed.barrier()
        return read_manifest(stage_dir(spec.build_dir, stage))
    for stale in checkpoints_root(spec).glob(f"{stage}-*"):
        if stale != work or force:
            shutil.rmtree(stale, ignore_errors=True)

    def build(out: Path) -> dict:
        distributed.share(True)
        return train(spec, stage, inputs, out, work, progress=progress)

    manifest = run_stage(stage, stage_dir(spec.build_dir, stage), build, release=spec.release.name, inputs=inputs,
                              spec_sections=sections, tools=TOOLS, force=force)
    if not manifest.built:
        distributed.share(False)
    distributed.barrier()
    if manifest.built:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def summary(spec: Spec, stage: str, manifest: Manifest, console=None) -> None:
    """One table row for the stage's run, then the hardware adaptations it made."""
    from rich.table import Table

    f = manifest.figures
    table = Table(title=f"{stage}: {spec.release.name} ({'built' if manifest.built else 'up to date'})")
    for col in ("steps", "examples", "tokens", "first loss", "last loss", "seconds", "optimizer", "bf16"):
        table.add_column(col, justify="left" if col == "optimizer" else "right")
    loss = lambda v: f"{v:.4f}" if isinstance(v, float) else "-"  # noqa: E731
    table.add_row(str(f["steps"]), f"{f['examples']:,}", f"{f['tokens'] or 0:,}", loss(f["first_loss"]),
                  loss(f["last_loss"]), f"{f['seconds']:.1f}", f["optimizer"], str(f["bf16"]))
    console = console or summary_console()
    console.print(table)
    console.print(f"adapter: {stage_dir(spec.build_dir, stage)}")
    for note in f.get("adaptations", []):
        console.print(f"adapted: {note}")

