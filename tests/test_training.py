"""The CPT and SFT stages on the real Unsloth code path (its CPU fallback here), on the demo's tiny
model and curated data, for a few steps: the loss falls, the adapters load in PEFT and change the
logits, the release merge takes the [cpt, sft] chain and reproduces the model SFT trained on, the
manifest records the hardware adaptations, and runs are reproducible: twice uninterrupted, and
killed (SIGKILL) then resumed, give the same adapter bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, demo_release
from release import pipeline
from release.artifacts import sha256_file
from training import stages

# A few optimizer steps are enough to exercise every part of both stages.
CPT_STEPS, SFT_STEPS = 3, 2


def _spec_text() -> str:
    text = (ROOT / "specs/demo.toml").read_text(encoding="utf-8")
    text = text.replace('format = "raw text"\n', f'format = "raw text"\nmax_steps = {CPT_STEPS}\n', 1)
    text = text.replace("train_on_responses_only = true\n",
                        f"train_on_responses_only = true\nmax_steps = {SFT_STEPS}\n", 1)
    assert text.count("max_steps") == 2
    # batch 1 x 2 accumulation: the same code path at half the compute per step
    text = text.replace("effective_batch_size = 4\nper_device_batch_size = 2\n",
                        "effective_batch_size = 2\nper_device_batch_size = 1\n")
    assert text.count("per_device_batch_size = 1") == 2
    # a checkpoint every step (the kill tests stop after checkpoint-2), and SFT at the learning rate
    # of an 8B's LoRA rather than the demo's 5e-3 (which learns its answers by heart in 140 steps):
    # the 1- and 2-process merges are compared within a bound set by one update step
    text = text.replace("save_steps = 3\n", "save_steps = 1\n")
    text = text.replace("learning_rate = 5e-3\n", "learning_rate = 2e-4\n")
    assert "save_steps = 1\n" in text and "learning_rate = 5e-3" not in text
    return text


def _release(folder: Path, tiny_model: Path):
    from release import spec

    s = spec.load(demo_release(folder, tiny_model, _spec_text()))
    pipeline.run_one(s, "data", progress=False)
    return s


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    s = _release(tmp_path_factory.mktemp("train-a"), tiny_model)
    cpt = pipeline.run_one(s, "cpt", progress=False)
    ran_cpt = cpt.built
    sft = pipeline.run_one(s, "sft", progress=False)
    ran_sft = sft.built
    assert ran_cpt and ran_sft
    return s, cpt, sft


def _adapter_sha(s, stage: str) -> str:
    return sha256_file(pipeline.folder(s, stage) / "adapter_model.safetensors")


def test_stage_outputs_and_manifest(trained):
    s, cpt, sft = trained
    for stage, m, steps in (("cpt", cpt, CPT_STEPS), ("sft", sft, SFT_STEPS)):
        out = pipeline.folder(s, stage)
        names = {e.path for e in m.outputs}
        assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "train.log"} <= names
        cfg = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
        assert cfg["base_model_name_or_path"] == s.base.model and cfg["r"] == s.lora.r
        assert cfg["lora_alpha"] == s.lora.alpha
        # sorted in the file (PEFT writes its sets in hash order, which changes per process)
        assert cfg["target_modules"] == sorted(s.lora.target_modules)
        assert (cfg["modules_to_save"] or []) == sorted(getattr(s.training, stage).modules_to_save)
        f = m.figures
        assert f["steps"] == steps and f["first_loss"] > 0 and f["last_loss"] > 0 and f["resumed_from"] is None
        state = json.loads((out / "trainer_state.json").read_text(encoding="utf-8"))
        assert [e["step"] for e in state["log_history"] if "loss" in e] == list(range(1, steps + 1))
        # the CPU's adaptations are recorded in the manifest and in the run log
        assert any(a.startswith("optimizer adamw_8bit -> adamw_torch_fused") for a in f["adaptations"])
        assert f["optimizer"] == "adamw_torch_fused"
        log = (out / "train.log").read_text(encoding="utf-8")
        for note in f["adaptations"]:
            assert f"adaptation: {note}" in log
    assert not list((s.build_dir / ".checkpoints").glob("cpt-*")), "checkpoints are removed after success"
    # SFT: loss only on the assistant turns, i.e. each answer and its <|eot_id|>
    from tokenizers import Tokenizer


    tok = Tokenizer.from_file(str(pipeline.base_model_dir(s) / "tokenizer.json"))
    chats = [json.loads(x)["messages"]
             for x in (pipeline.folder(s, "data") / "sft.jsonl").read_text(encoding="utf-8").splitlines()]
    answers = sum(len(tok.encode(c[-1]["content"], add_special_tokens=False).ids) + 1 for c in chats)
    assert sft.figures["label_tokens"] == answers < sft.figures["tokens"] / 2
    assert cpt.figures["label_tokens"] == cpt.figures["tokens"] == cpt.figures["examples"] * s.training.sequence_length
    again = pipeline.run_one(s, "cpt", progress=False)
    ran = again.built
    assert not ran and again.fingerprint == cpt.fingerprint


def test_adapters_load_in_peft_change_logits_and_lower_the_loss(trained):
    """The loss before and after each stage on all of its training data (CPT: every packed block;
    SFT: the answer tokens of every chat), evaluated in float32 without dropout: deterministic,
    and about the training alone, not about which batch a logged step happened to see (the
    logged per-step losses of a few steps go up and down with the batches)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer


    s, cpt, _ = trained
    base_dir = pipeline.base_model_dir(s)
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    texts = [json.loads(x)["text"]
             for x in (pipeline.folder(s, "data") / "cpt.jsonl").read_text(encoding="utf-8").splitlines()]
    blocks, _ = reference_pack_blocks(texts, tok, s.training.sequence_length)
    ids = torch.tensor(blocks)

    def loss(model) -> float:
        with torch.no_grad():
            return float(model(input_ids=ids, labels=ids).loss)

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = model(input_ids=ids[:1, :32]).logits
    before = loss(model)
    model = PeftModel.from_pretrained(model, str(pipeline.folder(s, "cpt"))).eval()
    with torch.no_grad():
        logits = model(input_ids=ids[:1, :32]).logits
    after = loss(model)
    assert (logits - base_logits).abs().max() > 1e-3
    assert after < before - 1e-3, (before, after)

    # SFT: the loss of the answers (what it trains on), rendered with the release's chat template
    from release import chat

    tok.chat_template = chat.jinja_template(s.chat)
    chats = [json.loads(x)["messages"]
             for x in (pipeline.folder(s, "data") / "sft.jsonl").read_text(encoding="utf-8").splitlines()]
    examples = []
    for messages in chats:
        prompt = tok(tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)["input_ids"]
        full = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
        assert full[:len(prompt)] == prompt
        examples.append((torch.tensor([full]), torch.tensor([[-100] * len(prompt) + full[len(prompt):]])))

    def answer_loss(model) -> float:
        total = count = 0
        with torch.no_grad():
            for x, y in examples:
                n = int((y[:, 1:] != -100).sum())
                total += float(model(input_ids=x, labels=y).loss) * n
                count += n
        return total / count

    merged = model.merge_and_unload()
    before = answer_loss(merged)
    sft = PeftModel.from_pretrained(merged, str(pipeline.folder(s, "sft"))).eval()
    with torch.no_grad():
        assert (sft(input_ids=ids[:1, :32]).logits - logits).abs().max() > 1e-4
    after = answer_loss(sft)
    assert after < before - 1e-3, (before, after)


def test_release_merge_takes_the_chain_and_reproduces_the_sft_base(trained, tmp_path):
    """release/merge.py on [cpt] gives the exact BF16 weights SFT trained on (PEFT merge_and_unload
    of the float32 base, rounded once), and it accepts the [cpt, sft] chain."""
    import torch
    from safetensors.torch import load_file

    from release import merge, shards

    s, _, _ = trained
    base_dir = pipeline.base_model_dir(s)
    cpt_dir, sft_dir = pipeline.folder(s, "cpt"), pipeline.folder(s, "sft")
    figures = merge.merge(base_dir, [cpt_dir, sft_dir], tmp_path / "chain", chat_spec=s.chat, inference=s.inference,
                          expected_base=s.base.model, progress=False)
    assert figures["adapters"] == 2 and figures["replaced"] == 2  # embed_tokens and lm_head from CPT

    merge.merge(base_dir, [cpt_dir], tmp_path / "cpt-only", chat_spec=s.chat, inference=s.inference,
                expected_base=s.base.model, progress=False)
    trained_on = stages._merged_cpt_model(pipeline.upstream(s, "sft"), tmp_path / "work", lambda line: None)
    ours = {}
    for f in sorted(trained_on.glob("*.safetensors")):
        ours.update(load_file(str(f)))
    files = shards.model_files(tmp_path / "cpt-only")
    assert set(files) == set(ours)
    for name, path in files.items():
        theirs = load_file(str(path))[name]
        assert theirs.dtype == ours[name].dtype == torch.bfloat16
        assert torch.equal(theirs, ours[name]), name


def reference_pack_blocks(texts: list[str], tokenizer, length: int) -> tuple[list[list[int]], int]:
    """CPT packing as training/stages.py did it before training/pack.py (kept here as the
    reference): each document as ``<|begin_of_text|> text <|end_of_text|>``, concatenated in one
    Python list and cut into full blocks of ``length`` tokens; returns the blocks and the number
    of tokens dropped."""
    stream: list[int] = []
    for text in texts:
        stream += [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"],
                   tokenizer.eos_token_id]
    n = len(stream) // length
    return [stream[i * length:(i + 1) * length] for i in range(n)], len(stream) - n * length


def test_packed_blocks_equal_the_reference_packing(tmp_path, tiny_model):
    """training/pack.py (datasets map over 2 worker processes, tiktoken ids, blocks cut from the
    Arrow column, memory-mapped) gives exactly the reference blocks on the demo's curated set,
    for 256-token blocks and for 61 (a length that cuts documents at odd places), and the same
    dropped remainder; without packing, each document's ids cut to the length. The trainer's
    tokenizer (transformers, from the model folder) gives the reference ids."""
    from transformers import AutoTokenizer

    from training import pack, tokens

    s = _release(tmp_path / "demo", tiny_model)
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    cpt = pipeline.folder(s, "data") / "cpt.jsonl"
    texts = [json.loads(x)["text"] for x in cpt.read_text(encoding="utf-8").splitlines()]
    counter = tokens.counter(tiny_model / "tokenizer.json")
    assert counter.engine == "tiktoken"
    for length in (256, 61):
        want, dropped = reference_pack_blocks(texts, tok, length)
        ds, figures = pack.pack_cpt(cpt, counter, length, tmp_path / f"w{length}", bos=tok.bos_token_id,
                                    eos=tok.eos_token_id, num_proc=2)
        assert ds["input_ids"][:] == want and figures == {"examples": len(want), "tokens": len(want) * length,
                                                          "dropped": dropped}
        assert [f["filename"] for f in ds.cache_files] == [str(tmp_path / f"w{length}" / "blocks.arrow")]  # mapped
        again, _ = pack.pack_cpt(cpt, counter, length, tmp_path / f"w{length}", bos=0, eos=0)  # done once: reused
        assert again["input_ids"][:] == want
    rows, f = pack.pack_cpt(cpt, counter, 64, tmp_path / "rows", bos=tok.bos_token_id, eos=tok.eos_token_id,
                            packing=False)
    assert rows["input_ids"][:] == [([tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"],
                                      tok.eos_token_id])[:64] for t in texts]
    assert f["tokens"] == sum(len(r) for r in rows["input_ids"][:])


def test_adaptations_are_made_in_one_visible_place(demo_spec):
    settings, notes = stages.adapt(demo_spec, "cpt", gpu=True)
    assert (notes == [] and settings["optim"] == "adamw_8bit" and settings["bf16"]
            and settings["load_dtype"] == "bfloat16")
    settings, notes = stages.adapt(demo_spec, "sft", gpu=False, bf16_native=False)
    assert settings["optim"] == "adamw_torch_fused" and not settings["bf16"] and settings["load_dtype"] == "float32"
    assert any(n.startswith("bf16 -> float32") for n in notes)
    settings, notes = stages.adapt(demo_spec, "sft", gpu=False, bf16_native=True)
    assert settings["bf16"] and settings["load_dtype"] == "float32"


def _kill_after_second_checkpoint(proc: subprocess.Popen, s, timeout: float) -> None:
    """SIGKILL ``proc`` as soon as the cpt stage of ``s`` has a complete checkpoint-2."""
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            ckpt = [p for p in (s.build_dir / ".checkpoints").glob("cpt-*/trainer/checkpoint-2")
                    if stages._last_checkpoint(p.parent) == p]
            if ckpt:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before its second checkpoint"


@pytest.mark.slow
def test_two_uninterrupted_runs_give_the_same_adapter(trained, tmp_path_factory, tiny_model):
    s, _, _ = trained
    again = _release(tmp_path_factory.mktemp("train-b"), tiny_model)
    pipeline.run_one(again, "cpt", progress=False)
    pipeline.run_one(again, "sft", progress=False)
    for stage in ("cpt", "sft"):
        assert _adapter_sha(again, stage) == _adapter_sha(s, stage), stage


# --- many processes: DDP through torchrun (gloo on this CPU) -----------------------------------

INVOKE = str(Path(sys.executable).with_name("invoke"))


def _losses(s, stage: str) -> list[float]:
    state = json.loads((pipeline.folder(s, stage) / "trainer_state.json").read_text(encoding="utf-8"))
    return [e["loss"] for e in state["log_history"] if "loss" in e]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, tiny_model):
    """The same release trained by 2 processes: CPT through `./inv train --processes 2`, SFT
    through `./inv release --only sft --processes 2` (the pipeline's wiring)."""
    s = _release(tmp_path_factory.mktemp("train-ddp"), tiny_model)
    for argv in (["train", "--stage", "cpt"], ["release", "--only", "sft"]):
        done = subprocess.run([INVOKE, *argv, "--spec", str(s.path), "--processes", "2"], cwd=ROOT,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "torch.distributed.run --nproc-per-node 2 --nnodes 1 --max-restarts 0 --standalone" in done.stderr
    return s


def test_two_processes_keep_the_global_batch_and_match_one_process(trained, ddp):
    """2 processes x batch 1 x no accumulation against 1 process x batch 1 x 2 accumulation: the
    same 2 blocks (chats) make each step, so the losses per step agree. Not bit for bit: DDP
    averages the two ranks' gradients with an all-reduce, one process adds them up in .grad,
    and float32 addition in another order differs in the last bits, which AdamW (it normalises
    each update, so a near-zero gradient's sign decides a whole step) and SFT's BF16-rounded
    merged base carry into the weights: measured 1.5e-4 relative at SFT's second step on an
    x86-64 CPU; 5e-4 is far below the loss's change between steps (~1e-2)."""
    s, cpt, sft = trained
    for stage, one in (("cpt", cpt), ("sft", sft)):
        m = read_manifest_of(ddp, stage)
        assert m.figures["processes"] == 2 and one.figures["processes"] == 1
        assert m.figures["steps"] == one.figures["steps"]
        log = (pipeline.folder(ddp, stage) / "train.log").read_text(encoding="utf-8")
        assert "batch 1 x 1 accumulation x 2 processes = 2" in log, log
        assert "batch 1 x 2 accumulation = 2" in (pipeline.folder(s, stage) / "train.log").read_text(encoding="utf-8")
        a, b = _losses(s, stage), _losses(ddp, stage)
        assert len(a) == len(b) == one.figures["steps"]
        assert a == pytest.approx(b, rel=5e-4), (stage, a, b)
        assert len(set(a)) > 1  # the steps differ: the comparison can fail


def read_manifest_of(s, stage: str):
    from release.artifacts import read_manifest

    m = read_manifest(pipeline.folder(s, stage))
    assert m is not None
    return m


def test_two_process_adapters_load_in_peft_and_merge(trained, ddp, tmp_path):
    """The 2-process adapters load in PEFT, and release/merge.py merges the [cpt, sft] chain into
    weights within bf16 rounding of the 1-process release's (the same training, up to the float
    order the test above bounds)."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from release import merge, shards

    s, _, _ = trained
    ids = torch.arange(10, 42)[None]
    model = AutoModelForCausalLM.from_pretrained(str(pipeline.base_model_dir(ddp)), dtype=torch.float32).eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        after = PeftModel.from_pretrained(model, str(pipeline.folder(ddp, "cpt"))).eval()(input_ids=ids).logits
    assert (after - before).abs().max() > 1e-3
    merged = {}
    for name, release_spec in (("ddp", ddp), ("one", s)):
        chain = [pipeline.folder(release_spec, "cpt"), pipeline.folder(release_spec, "sft")]
        merge.merge(pipeline.base_model_dir(release_spec), chain, tmp_path / name, chat_spec=release_spec.chat,
                    inference=release_spec.inference, expected_base=release_spec.base.model, progress=False)
        merged[name] = {k: load_file(str(p))[k] for k, p in shards.model_files(tmp_path / name).items()}
    assert set(merged["ddp"]) == set(merged["one"])
    equal = total = 0
    for k, w in merged["ddp"].items():
        ref = merged["one"][k].float()
        # AdamW normalises each update, so where a gradient is near zero the float order of the
        # all-reduce can flip its sign: the adapters differ by whole update steps, not rounding,
        # and the merged weight by up to a bf16 step at the tensor's scale (measured: 2**-10 of
        # the largest magnitude; bound 2**-8)
        assert (w.float() - ref).abs().max() <= 2 ** -8 * ref.abs().max(), k
        equal, total = equal + int((w == merged["one"][k]).sum()), total + w.numel()
    # measured 99.88% of the weights are the same bytes (99.98% with LoRA r 8; r 64 sums more
    # update steps into each weight): not vacuous
    assert equal / total >= 0.998


def _workers(spec_path: Path) -> list:
    import psutil

    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "training.worker" in cmd and str(spec_path) in cmd:
            out.append(p)
    return out


# --- two hosts: two launchers on this machine, meeting at a rendezvous on 127.0.0.1 -------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_hosts_cmd(spec_path: Path, port: int, *extra: str) -> list[str]:
    """`./inv train` as each of two hosts runs it (README, "Many GPUs, many hosts")."""
    return [INVOKE, "train", "--stage", "cpt", "--spec", str(spec_path), "--nodes", "2", "--processes", "1",
            "--rdzv", f"127.0.0.1:{port}", *extra]


def _launch(cmd: list[str], log: Path) -> subprocess.Popen:
    """One "host": a launcher with one core's worth of threads, as torchrun gives each process of a
    one-host run (OMP_NUM_THREADS=1). Two hosts on one 2-core machine each have a core; with two
    threads each they oversubscribe it, and a resumed step's float sums then differed in their last
    bits in one run of three."""
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, QALB_PROGRESS="0", OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory, tiny_model):
    """CPT trained by two launchers at once, as two hosts of one process each would run it; while
    they train, a third writer of the same build folder is refused."""
    s = _release(tmp_path_factory.mktemp("train-2hosts"), tiny_model)
    port, logs = _free_port(), tmp_path_factory.mktemp("train-2hosts-logs")
    hosts = [_launch(_two_hosts_cmd(s.path, port), logs / f"host{i}.log") for i in (0, 1)]
    try:
        from release import lock

        deadline = time.time() + 300
        while time.time() < deadline and "train" not in getattr(lock.holder(s.build_dir), "command", ""):
            time.sleep(0.2)
        other = subprocess.run([INVOKE, "data", "--spec", str(s.path), "--force"], cwd=ROOT, capture_output=True,
                               text=True, timeout=120)
        for h in hosts:
            h.wait(timeout=900)
    finally:
        for h in hosts:
            if h.poll() is None:
                h.kill()
                h.wait()
    out = [(logs / f"host{i}.log").read_text(encoding="utf-8") for i in (0, 1)]
    assert [h.returncode for h in hosts] == [0, 0], out[0][-3000:] + out[1][-3000:]
    return s, out, other


def test_two_launchers_train_as_two_hosts_like_one_host_of_two_processes(ddp, two_hosts):
    """Two `./inv train --nodes 2 --processes 1 --rdzv 127.0.0.1:PORT` launchers meet (torchrun's
    c10d rendezvous, gloo) and train as one world of 2: the per-step losses equal the one-host
    2-process run's within the tolerance above; rank 0 alone writes one adapter and one manifest;
    the launchers share the build folder's lock, and any other writer is refused."""
    s, out, other = two_hosts
    for text in out:
        assert "--nnodes 2 --max-restarts 0 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:" in text
    m = read_manifest_of(s, "cpt")
    assert m.figures["processes"] == 2 and m.figures["steps"] == read_manifest_of(ddp, "cpt").figures["steps"]
    assert "batch 1 x 1 accumulation x 2 processes = 2" in (pipeline.folder(s, "cpt") / "train.log").read_text()
    a, b = _losses(ddp, "cpt"), _losses(s, "cpt")
    assert len(a) == len(b) == m.figures["steps"] and len(set(a)) > 1
    assert b == pytest.approx(a, rel=5e-4), (a, b)
    assert sorted(p.name for p in pipeline.folder(s, "cpt").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "manifest.json", "train.log", "trainer_state.json"]
    assert not list((s.build_dir / ".checkpoints").glob("cpt-*"))  # removed once the adapter was written
    assert other.returncode == 2, other.stderr
    refused = f"error: {s.build_dir}: another run is writing this build folder (pid "
    assert other.stderr.startswith(refused), other.stderr
    assert len(other.stderr.strip().splitlines()) == 1


def test_a_sigkilled_host_stops_both_and_both_resume_to_the_same_bytes(two_hosts, tmp_path_factory, tiny_model):
    """One of two launchers SIGKILLed after the second checkpoint: its torchrun and worker die with
    it, the other host's worker loses its peer and its launcher ends in one line; no worker is left
    anywhere. Both commands run again resume from checkpoint-2 and write the same adapter, adapter
    config and trainer state bytes as the uninterrupted two-host run."""
    done, _, _ = two_hosts
    killed = _release(tmp_path_factory.mktemp("train-2hosts-killed"), tiny_model)
    port, logs = _free_port(), tmp_path_factory.mktemp("train-2hosts-killed-logs")
    survivor = _launch(_two_hosts_cmd(killed.path, port), logs / "survivor.log")
    victim = _launch(_two_hosts_cmd(killed.path, port), logs / "victim.log")
    try:
        _kill_after_second_checkpoint(victim, killed, timeout=600)
        survivor.wait(timeout=120)
    finally:
        if survivor.poll() is None:
            survivor.kill()
            survivor.wait()
    tail = (logs / "survivor.log").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert survivor.returncode == 2 and tail.startswith("error: cpt: a training process on another host stopped"), tail
    for _ in range(100):
        if not _workers(killed.path):
            break
        time.sleep(0.1)
    assert not _workers(killed.path), "workers outlived their launchers"
    assert not (pipeline.folder(killed, "cpt") / "manifest.json").exists()
    port = _free_port()
    again = [_launch(_two_hosts_cmd(killed.path, port), logs / f"again{i}.log") for i in (0, 1)]
    for h in again:
        h.wait(timeout=900)
    assert [h.returncode for h in again] == [0, 0], (logs / "again0.log").read_text()[-3000:]
    m = read_manifest_of(killed, "cpt")
    assert m.figures["resumed_from"] == "checkpoint-2" and m.figures["processes"] == 2
    for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json"):
        ours, theirs = pipeline.folder(killed, "cpt") / name, pipeline.folder(done, "cpt") / name
        assert sha256_file(ours) == sha256_file(theirs), name


def test_a_rendezvous_that_never_completes_and_a_host_with_another_spec_are_one_line_each(two_hosts, tmp_path):
    """A second host that never comes: the first stops after --join-timeout in one line. A host
    whose spec file differs from rank 0's (here: another learning rate): both stop in one line
    naming it, before a step is trained."""
    import re
    import shutil

    s, _, _ = two_hosts
    built = (pipeline.folder(s, "cpt") / "manifest.json").read_bytes()
    alone = subprocess.run(_two_hosts_cmd(s.path, _free_port(), "--join-timeout", "3", "--force"), cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    last = alone.stderr.strip().splitlines()[-1]
    assert alone.returncode == 2 and re.fullmatch(
        r"error: cpt: the 2 hosts did not all join the rendezvous at 127\.0\.0\.1:\d+ within 3 s \(--join-timeout\); "
        r"start the same command on every host, each reaching 127\.0\.0\.1:\d+", last), last
    other = s.path.parent.parent / "specs-other"
    shutil.copytree(s.path.parent, other, symlinks=True)
    text = s.path.read_text(encoding="utf-8")
    changed = re.sub(r"(\[training\.cpt\]\n(?:.*\n)*?learning_rate = )\S+", r"\g<1>1e-5", text, count=1)
    assert changed != text
    (other / s.path.name).write_text(changed, encoding="utf-8")
    port = _free_port()
    hosts = [_launch(_two_hosts_cmd(p, port, "--force"), tmp_path / f"h{i}.log")
             for i, p in enumerate((s.path, other / s.path.name))]
    for h in hosts:
        h.wait(timeout=300)
    for i, h in enumerate(hosts):
        last = (tmp_path / f"h{i}.log").read_text(encoding="utf-8").strip().splitlines()[-1]
        assert h.returncode == 2 and re.fullmatch(
            r"error: cpt: rank \d on \S+ differs from rank 0 on \S+ in its spec file, inputs; every host must run "
            r"the same checkout, environment and spec file \(and see the same build folder\), then the same command",
            last), last
    assert (pipeline.folder(s, "cpt") / "manifest.json").read_bytes() == built  # what was built is kept


def test_the_checkout_digest_covers_the_code_and_nothing_else(tmp_path):
    """What the hosts compare (besides the spec file, environment and inputs): a copy of the
    checkout has the same digest; a changed line of code, or of pyproject.toml, another one; a
    build folder or a test does not count."""
    import shutil

    from training import distributed

    copy = tmp_path / "checkout"
    for name in ("release", "training"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("tasks.py", "pyproject.toml"):
        shutil.copy2(ROOT / name, copy / name)
    same = distributed.checkout(copy)
    assert same == distributed.checkout() and len(same) == 64
    (copy / "build").mkdir()
    (copy / "build" / "x.py").write_text("x = 1\n")
    assert distributed.checkout(copy) == same
    stages_py = copy / "training" / "stages.py"
    stages_py.write_text(stages_py.read_text() + "# another line\n")
    changed = distributed.checkout(copy)
    assert changed != same
    (copy / "pyproject.toml").write_text((copy / "pyproject.toml").read_text() + "\n")
    assert distributed.checkout(copy) not in (same, changed)


def test_launch_options_and_the_derived_batch():
    from release.errors import StageError
    from training import distributed

    assert distributed.batch(4, 2, 1) == (2, 2)
    assert distributed.batch(4, 2, 2) == (2, 1)
    assert distributed.batch(4, 2, 4) == (1, 1)
    assert distributed.batch(64, 8, 8) == (8, 1) and distributed.batch(64, 2, 8) == (2, 4)
    assert distributed.batch(24, 5, 2) == (4, 3)  # the largest per-device batch up to 5 that divides 12
    with pytest.raises(StageError, match="effective_batch_size 4 is not a multiple of the 3 training processes"):
        distributed.batch(4, 2, 3)
    assert distributed.launch("8", "1", None) == distributed.Launch(8, 1, None, 600)
    assert distributed.launch(8, 2, "node0:29500", "30").join_timeout == 30
    with pytest.raises(StageError, match="--join-timeout 0: each must be at least 1"):
        distributed.launch(8, 2, "node0:29500", 0)
    with pytest.raises(StageError, match=r"--nodes 2: give the rendezvous with --rdzv HOST:PORT"):
        distributed.launch(8, 2, None)
    with pytest.raises(StageError, match="--rdzv node0: expected HOST:PORT"):
        distributed.launch(8, 2, "node0")
    with pytest.raises(StageError, match="at least 1"):
        distributed.launch(0, 1, None)
    inputs = {"base": Path("b"), "data": Path("d")}
    two_hosts = distributed.command(Path("specs/qalb.toml"), "cpt", inputs, distributed.launch(8, 2, "node0:29500"),
                                    force=True)
    assert two_hosts[1:] == ["-m", "torch.distributed.run", "--nproc-per-node", "8", "--nnodes", "2",
                             "--max-restarts", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29500",
                             "--rdzv-id", "qalb-cpt", "--rdzv-conf", "join_timeout=600", "-m", "training.worker",
                             "--spec", "specs/qalb.toml",
                             "--stage", "cpt", "--inputs", '{"base": "b", "data": "d"}', "--force"]
    bad = subprocess.run([INVOKE, "train", "--stage", "cpt", "--nodes", "2"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --nodes 2: give the rendezvous"), bad.stderr


def test_torchruns_endings_are_told_apart_in_one_line():
    """What the launcher says when torchrun ends, read from its output (the texts as torchrun 2.13
    writes them): a worker's own error, a rendezvous never completed, a peer that went away, the
    store's host that went away while training (seen in containers when rank 0's host was
    killed), a store never reached."""
    from training import distributed

    how = distributed.Launch(processes=1, nodes=2, rdzv="127.0.0.1:29500", join_timeout=3)
    conn = ("torch.distributed.elastic.rendezvous.api.RendezvousConnectionError: The connection to the C10d "
            "store has failed. See inner exception for details.\n")
    cases = {
        "cpt: bad input": ["[train] step 1: loss 13.0\n", "error: [rank 1] bad input\n"],
        "cpt: the 2 hosts did not all join": ["torch.distributed.elastic.rendezvous.api.RendezvousTimeoutError\n"],
        "cpt: a training process on another host stopped": ["RuntimeError: Connection closed by peer\n"],
        "cpt: the host serving the rendezvous at 127.0.0.1:29500 stopped": [
            "[train] step 2: loss 13.1\n", "    num_nodes_waiting = rdzv_handler.num_nodes_waiting()\n", conn],
        "cpt: cannot reach the rendezvous at 127.0.0.1:29500": ["    self._state_holder.sync()\n", conn],
        "cpt: torchrun ended with exit status -9": ["[train] step 1: loss 13.0\n"],
    }
    for start, lines in cases.items():
        assert distributed.failure("cpt", -9, lines, how).startswith(start), (start, lines)
    alone = distributed.Launch()  # one process: the worker without torchrun
    assert distributed.failure("cpt", 1, ["Traceback ...\n"], alone).startswith(
        "cpt: the training process ended with exit status 1")


def test_bad_input_to_one_training_process_is_one_line(tmp_path, tiny_model):
    """One process trains in a child (the worker alone): its error is the launcher's one line,
    not echoed twice, and nothing is left in the stage's folder."""
    from release import spec

    text = _spec_text().replace("sequence_length = 256\n", "sequence_length = 8192\n")
    s = spec.load(demo_release(tmp_path, tiny_model, text))
    pipeline.run_one(s, "data", progress=False)
    done = subprocess.run([INVOKE, "train", "--stage", "cpt", "--spec", str(s.path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and errors == [
        f"error: cpt: {pipeline.folder(s, 'data') / 'cpt.jsonl'}: fewer than 8192 tokens of text; add data or lower "
        "training.sequence_length"], done.stderr[-3000:]
    assert not pipeline.folder(s, "cpt").exists()
