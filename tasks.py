"""Tasks of the Qalb release toolchain (`./inv --list`). Thin: parse arguments, call release/.

Each stage of the pipeline has a task of the same name (``train --stage`` for cpt and sft), run
through ``release/pipeline.py`` so that it gets its inputs and the disk preflight like a release.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from invoke import Collection, Exit, task

from release.quiet import bars_only_on_a_terminal

bars_only_on_a_terminal()  # before the libraries are imported: they read their switches then
ROOT = Path(__file__).parent
DEMO = "specs/demo.toml"
WAIT_HELP = "if another run is writing the build folder, wait for it instead of refusing"
RUNNER_HELP = "docker: run in the task's container image; local: here (default: docker for training on a GPU host)"
LAUNCH_HELP = {
    "processes": "training processes per host (DDP through torchrun: one per GPU; default 1)",
    "nodes": "hosts taking part (each runs the same command; default 1)",
    "rdzv": "HOST:PORT where the hosts meet (torchrun's c10d rendezvous; needed with --nodes > 1)",
    "join-timeout": "seconds the hosts have to meet at the rendezvous (default 600)",
}


def _guarded(fn: Callable[[], object]) -> object:
    """Run ``fn`` (with the libraries' known-harmless notices dropped: release/quiet.py); turn the
    toolchain's own errors (and a full disk met outside a stage's build) into one line each on
    stderr and exit 2, and an interrupt (Ctrl-C, or SIGTERM, which raises as Ctrl-C does) into one
    line and exit 128 + its signal (130, 143)."""
    import errno
    import signal

    from release import interrupts
    from release.errors import Interrupted, ReleaseError
    from release.quiet import known_notices, silence_open_bars

    try:
        with interrupts.handled(), known_notices():
            return fn()
    except ReleaseError as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        raise Exit(code=2) from None
    except OSError as e:
        if e.errno != errno.ENOSPC:  # anything else is a bug and keeps its traceback
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(f"error: the disk is full{where}; free space and run the same command to resume "
              "(finished stages are kept)", file=sys.stderr)
        raise Exit(code=2) from None
    except (Interrupted, KeyboardInterrupt) as e:
        stopped = e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT)
        print(("\n" if silence_open_bars() else "") + str(stopped), file=sys.stderr)
        raise Exit(code=128 + stopped.signum) from None


def _locked(s, fn: Callable[[], object], wait: bool) -> object:
    """``fn()`` holding the build folder's writer lock (release/lock.py), for the tasks that write
    into it without the pipeline."""
    from release import lock

    def held():
        with lock.hold(s.build_dir, wait=wait, notice=lambda text: print(text, file=sys.stderr)):
            return fn()

    return _guarded(held)


def _refuse(message: str) -> None:
    """Stop with a usage error, printed as every user error is (one line, exit 2)."""
    from release.errors import UsageError

    def fail() -> None:
        raise UsageError(message)

    _guarded(fail)


SIGNING_HELP = ("private EC P-256 key (PEM) to sign every repo with (default: $QALB_SIGNING_KEY; `sigstore` for "
                "Sigstore keyless signing); ./inv keygen makes one")


def _signing_key(path: str | None) -> None:
    """``--signing-key``: handed to the stages as ``QALB_SIGNING_KEY`` (a path, never the key),
    where the cards (the public key, its fingerprint) and the publish stage (the signatures) read it."""
    import os

    from release import signing

    if path:
        os.environ[signing.ENV_KEY] = path if path in signing.KEYLESS else str(Path(path).expanduser().resolve())
        _guarded(signing.from_environment)  # a key that cannot be used: one line now, not after the build


def _help_asked(name: str, value: str | None) -> bool:
    """``./inv TASK --help`` for a task with a positional argument, which invoke's parser hands
    the task as that argument's value: print the task's help (``inv --help TASK``) instead."""
    if value not in ("--help", "-h"):
        return False
    import subprocess

    subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), "--help", name], check=False)
    return True


def _spec(path: str):
    from release import spec

    return _guarded(lambda: spec.load(path))


def _runner(name: str, runner: str | None, image: tuple[str, bool] | None = None, **options: object) -> bool:
    """With the docker runner, run task ``name`` with ``options`` in ``image`` (default: the
    release image) and return True."""
    from release import docker

    def build_dir() -> Path | None:
        return _spec(str(options["spec"])).build_dir if options.get("spec") else None

    return bool(_guarded(lambda: docker.dispatch(name, runner, options, ROOT, image=image or docker.RELEASE_IMAGE,
                                                 build_dir=build_dir() if runner != "local" else None)))


def _stage(spec_path: str, name: str, *, force: bool = False, **kwargs: object):
    """Run pipeline stage ``name`` of the spec alone (its inputs must be built); its result."""
    from release import pipeline

    s = _spec(spec_path)
    return s, _guarded(lambda: pipeline.run(s, only=name, force=force, root=ROOT, **kwargs))[0]


@task(help={"slow": "also run the opt-in slow tests", "k": "only tests matching this expression",
            "gpu": "run only the GPU tests (CUDA kernels, NCCL, the train image with --gpus all): on a GPU host",
            "args": "extra arguments for pytest"})
def test(c, slow=False, k="", gpu=False, args=""):
    """Run the test suite (tiny models, CPU only, offline) and list its 15 slowest tests; --gpu:
    the GPU tests instead."""
    cmd = [sys.executable, "-m", "pytest", "-q", "--durations=15"]
    if slow:
        cmd.append("--slow")
    if gpu:
        cmd += ["--gpu", "-m", "gpu"]
    if k:
        cmd += ["-k", k]
    c.run(shlex.join(cmd) + (f" {args}" if args else ""), pty=False)


@task(help={"spec": "release spec to check (default: both bundled specs)"})
def spec(c, spec=None):
    """Validate release specs and show the release they describe; warn (without failing) about
    what the owner may want to change, such as a model name the base's licence asks for."""
    from release.spec import SpecError, load, owner_warnings

    failed = False
    for path in [spec] if spec else ["specs/qalb.toml", DEMO]:
        try:
            s = load(path)
        except SpecError as e:
            failed = True
            for line in e.problems:
                print(f"error: {line}", file=sys.stderr)
            continue
        tags = ", ".join(f"{s.ollama.model}:{t}" for t in s.ollama.tags.values())
        print(f"{path}: ok: {s.release.name} {s.release.version} from {s.base.model}; "
              f"{len(s.variants)} variants ({', '.join(v.repo for v in s.variants.values())}); "
              f"GGUF {', '.join(s.gguf_types())}; Ollama {tags}")
        for line in owner_warnings(s):
            print(f"warning: {path}: {line}", file=sys.stderr)
        _disk_estimate(s)
    if failed:
        raise Exit(code=2)


def _disk_estimate(s) -> None:
    """The spec's disk estimate per stage and variant (release/preflight.py), with the free space."""
    from rich.table import Table

    from release import preflight
    from release.artifacts import human_bytes, summary_console

    config = _guarded(lambda: preflight.base_config(s, online=False))
    if config is None:
        print(f"  disk estimate: needs {s.base.model}'s config.json (not cached; `./inv base` fetches the base)")
        return
    needs = preflight.estimate(s, config)
    table = Table(title=f"disk estimate: {s.release.name}")
    for col in ("stage", "what", "size", "kept"):
        table.add_column(col, justify="right" if col == "size" else "left")
    for n in needs:
        table.add_row(n.stage, n.what, human_bytes(n.bytes), "while the stage runs" if n.transient else n.where)
    summary_console().print(table)
    print(f"  peak in {s.build_dir}: {human_bytes(preflight.total(needs))} "
          f"({human_bytes(preflight.free_bytes(s.build_dir))} free there now)")


@task(help={
    "out": "folder to write the model to",
    "spec": f"release spec whose [base.scaffold] and tokenizer facts to use (default {DEMO})",
    "shape": "'spec' (the spec's [base.scaffold]) or '8b' (Llama 3.1 8B layer shapes)",
    "layers": "with --shape 8b: number of layers",
    "seed": "random seed",
    "force": "rebuild even if up to date",
    "runner": RUNNER_HELP,
})
def scaffold(c, out=None, spec=DEMO, shape="spec", layers="2", seed="0", force=False, runner=None):
    """Write a standalone random-init Llama-3 model (real Llama 3 tokenizer) to --out, e.g. one with
    Llama 3.1 8B layer shapes for benchmarks. A release's base model is the base stage's: ./inv base."""
    from release import scaffold as kit
    from release.artifacts import human_bytes
    from release.errors import UsageError

    def build():
        if out is None:
            raise UsageError("scaffold: give --out DIR (a release's base model is built by ./inv base)")
        return kit.standalone(_spec(spec), Path(out), shape=shape, layers=layers, seed=seed, force=force)

    if _runner("scaffold", runner, spec=spec, out=out, shape=shape, layers=layers, seed=seed, force=force):
        return
    f = _guarded(build).figures
    print(f"{out}: {f['parameters']:,} parameters, {human_bytes(f['bytes'])} in {f['shards']} shard(s)")


@task(help={"spec": f"release spec (default {DEMO})", "force": "rebuild even if up to date", "runner": RUNNER_HELP,
            "wait": WAIT_HELP})
def base(c, spec=DEMO, force=False, runner=None, wait=False):
    """Stage base: the spec's base model (built from [base.scaffold], recorded from base.path, or
    downloaded from the Hub into its cache)."""
    from release import pipeline

    if _runner("base", runner, spec=spec, force=force):
        return
    s, result = _stage(spec, "base", force=force, wait=wait)
    pipeline.summary(s, [result])


@task(help={"spec": f"release spec (default {DEMO})", "force": "curate again even if up to date",
            "runner": RUNNER_HELP, "wait": WAIT_HELP,
            "executor": "where datatrove's jobs run: local (every core here; default), ray or slurm",
            "address": "with --executor ray: HOST:PORT of the Ray cluster's head",
            "partition": "with --executor slurm: the Slurm partition"})
def data(c, spec=DEMO, force=False, runner=None, wait=False, executor="local", address=None, partition=None):
    """Stage data: curate the corpora into the CPT and SFT sets with a retention report."""
    from training import cluster
    from training import data as stage

    where = _guarded(lambda: cluster.executor(executor, address, partition))
    if where == cluster.LOCAL and _runner("data", runner, image=(stage.TRAITS.image, stage.TRAITS.gpu), spec=spec,
                                          force=force):
        return
    s, result = _stage(spec, stage.STAGE, force=force, wait=wait, executor=where,
                       runner="docker" if runner == "docker" else "local")
    stage.summary(s, result.manifest)


@task(help={"stage": "cpt (continued pre-training) or sft (instruction fine-tuning)",
            "spec": f"release spec (default {DEMO})", "force": "train again even if up to date",
            "runner": RUNNER_HELP, "wait": WAIT_HELP, **LAUNCH_HELP})
def train(c, stage=None, spec=DEMO, force=False, runner=None, processes=1, nodes=1, rdzv=None, wait=False,
          join_timeout=600):
    """Stages cpt and sft: train a LoRA with Unsloth (build/<release>/<stage>); an interrupted run resumes."""
    from release.errors import UsageError
    from training import cpt, distributed, sft, stages

    def launch():
        if stage not in (cpt.STAGE, sft.STAGE):
            given = "give --stage" if stage is None else f"--stage {stage}: expected"
            raise UsageError(f"train: {given} {cpt.STAGE} (continued pre-training) or {sft.STAGE} "
                             "(instruction fine-tuning)")
        return distributed.launch(processes, nodes, rdzv, join_timeout)

    how = _guarded(launch)
    traits = {cpt.STAGE: cpt, sft.STAGE: sft}[stage].TRAITS
    if _runner("train", runner, image=(traits.image, traits.gpu), stage=stage, spec=spec, force=force,
               processes=how.processes, nodes=how.nodes, rdzv=how.rdzv, join_timeout=how.join_timeout):
        return
    s, result = _stage(spec, stage, force=force, launch=how, wait=wait)
    stages.summary(s, stage, result.manifest)


TRAIN_HELP = {"spec": f"release spec (default {DEMO})", "force": "train again even if up to date",
              "runner": RUNNER_HELP, "wait": WAIT_HELP, **LAUNCH_HELP}


@task(help=TRAIN_HELP)
def cpt(c, spec=DEMO, force=False, runner=None, processes=1, nodes=1, rdzv=None, wait=False, join_timeout=600):
    """Stage cpt: continued pre-training, a LoRA on the base (as train --stage cpt)."""
    train(c, "cpt", spec, force, runner, processes, nodes, rdzv, wait, join_timeout)


@task(help=TRAIN_HELP)
def sft(c, spec=DEMO, force=False, runner=None, processes=1, nodes=1, rdzv=None, wait=False, join_timeout=600):
    """Stage sft: instruction fine-tuning, a LoRA on base + CPT (as train --stage sft)."""
    train(c, "sft", spec, force, runner, processes, nodes, rdzv, wait, join_timeout)


@task(iterable=["adapter"], help={
    "spec": f"release spec (default {DEMO})",
    "base": "base model folder (default: the base stage's); with --adapter",
    "adapter": "PEFT adapter folder; repeat for several, applied in order (CPT, then SFT); default: the "
               "release's cpt and sft stages",
    "out": "output folder, with --adapter (default build/<release>/merge); gets bf16/ and, if the spec has it, fp16/",
    "force": "merge again even if up to date",
    "runner": RUNNER_HELP,
    "wait": WAIT_HELP,
})
def merge(c, spec=DEMO, base=None, adapter=None, out=None, force=False, runner=None, wait=False):
    """Stage merge: LoRA adapters into the base model, streamed BF16 (and FP16) safetensors."""
    from release import merge as stage
    from release import pipeline
    from release.artifacts import human_bytes

    if _runner("merge", runner, spec=spec, base=base, adapter=adapter, out=out, force=force):
        return
    if not adapter:
        if base or out:
            _refuse("--base/--out: give the adapters too (--adapter FOLDER, repeated); without them the "
                    "release's stages are merged")
        s, result = _stage(spec, stage.STAGE, force=force, wait=wait)
        manifest, out_dir = result.manifest, result.directory
    else:
        s = _spec(spec)
        base_dir = Path(base) if base else pipeline.base_model_dir(s)
        out_dir = Path(out) if out else pipeline.folder(s, stage.STAGE)
        manifest = _locked(s, lambda: stage.run_merge(s, base_dir, [Path(a) for a in adapter], out_dir, force=force),
                           wait)
    f = manifest.figures
    print(f"{out_dir}: {'built' if manifest.built else 'up to date'}, {len(manifest.outputs)} files")
    print(f"{f['tensors']} tensors ({f['lora_merged']} LoRA merges, {f['replaced']} replaced), "
          f"{human_bytes(f['bytes_written'])} written in {f['seconds']} s, peak RSS {f['peak_rss_mb']} MB")


@task(help={"spec": f"release spec (default {DEMO})", "force": "quantize again even if up to date",
            "runner": RUNNER_HELP, "wait": WAIT_HELP})
def bnb4(c, spec=DEMO, force=False, runner=None, wait=False):
    """Stage bnb4: the bitsandbytes 4-bit variant of the merged BF16 model."""
    from release import pipeline

    if _runner("bnb4", runner, spec=spec, force=force):
        return
    s, result = _stage(spec, "bnb4", force=force, wait=wait)
    pipeline.summary(s, [result])


@task(help={
    "spec": f"release spec (default {DEMO})",
    "model": "HF Llama folder to convert (default: the spec's merged BF16 model)",
    "force": "convert again even if up to date",
    "runner": RUNNER_HELP,
    "wait": WAIT_HELP,
})
def gguf(c, spec=DEMO, model=None, force=False, runner=None, wait=False):
    """Stage gguf: convert to GGUF (F16/BF16/Q8_0) and quantize with llama.cpp (the spec's quant types)."""
    from rich.table import Table

    from release import gguf as stage
    from release.artifacts import summary_console

    if _runner("gguf", runner, spec=spec, model=model, force=force):
        return
    if model is None:
        s, result = _stage(spec, stage.STAGE, force=force, wait=wait)
        manifest = result.manifest
    else:
        s = _spec(spec)
        manifest = _locked(s, lambda: stage.run(s, {"model": Path(model)}, force=force), wait)
    table = Table(title=f"GGUF files of {s.release.name} ({'built' if manifest.built else 'up to date'})")
    for col in ("type", "file", "size", "bits/weight", "sha256", "seconds"):
        table.add_column(col)
    for row in stage.summary_rows(manifest.figures["files"]):
        table.add_row(*row)
    summary_console().print(table)


@task(help={"spec": f"release spec (default {DEMO})", "force": "verify again even if up to date", "wait": WAIT_HELP})
def verify(c, spec=DEMO, force=False, wait=False):
    """Stage verify: build what verification needs, then run the release gates on every variant
    (exit 2 on a failure)."""
    from release import pipeline
    from release import verify as stage
    from release.artifacts import read_manifest, summary_console

    s = _spec(spec)
    results = _guarded(lambda: pipeline.run(s, until=stage.STAGE, force={stage.STAGE} if force else False, wait=wait))
    pipeline.summary(s, results, artifacts=True)
    summary_console().print(pipeline.verify_table(read_manifest(pipeline.folder(s, stage.STAGE)).figures))
    print(f"{s.release.name} {s.release.version}: every release gate passed")


@task(help={
    "spec": "release spec (default specs/qalb.toml)",
    "out": "folder for the Modelfiles (default modelfiles/)",
    "check": "validate this Modelfile with Ollama's grammar instead of writing",
    "runner": RUNNER_HELP,
})
def modelfiles(c, spec="specs/qalb.toml", out="modelfiles", check=None, runner=None):
    """Stage modelfiles' files into --out (one Ollama Modelfile per GGUF type, named after its tag,
    the hf.co template/system/params files and the LICENSE), or --check one Modelfile."""
    from release import modelfiles as stage

    if _runner("modelfiles", runner, spec=spec, out=out, check=check):
        return
    if check:
        mf = _guarded(lambda: stage.check_file(Path(check)))
        print(f"{check}: ok: FROM {mf.model}; {len(mf.parameters)} parameters "
              f"({', '.join(mf.parameters)}); template {'set' if mf.template else 'not set'}; "
              f"system {'set' if mf.system else 'not set'}")
        return
    s = _spec(spec)
    written = _guarded(lambda: stage.write_all(s, Path(out)))
    for qtype in s.gguf_types():
        path = Path(out) / stage.modelfile_name(s, qtype)
        print(f"{path}: {s.ollama.model}:{s.ollama.tags[qtype]} from {s.gguf_file_name(qtype)}")
    print(f"{len(written)} files in {out}: " + ", ".join(p.name for p in written if p.suffix != ".Modelfile"))


@task(help={"spec": f"release spec (default {DEMO})", "force": "write the cards again even if up to date",
            "wait": WAIT_HELP, "signing-key": SIGNING_HELP})
def cards(c, spec=DEMO, force=False, wait=False, signing_key=None):
    """Stage cards: the model card of every repo, build/<release>/cards/<variant>/README.md."""
    from release import pipeline

    _signing_key(signing_key)
    s, result = _stage(spec, "cards", force=force, wait=wait)
    pipeline.summary(s, [result])
    if not result.manifest.figures.get("verified"):
        print("note: no verification manifest yet, so the variants table has no figures; "
              "run ./inv release --from verify")


UNSIGNED_HELP = "push without signatures (refused otherwise when no signing key is given)"


@task(help={"spec": f"release spec (default {DEMO})", "push": "upload and tag (default: show the plan only)",
            "wait": WAIT_HELP, "signing-key": SIGNING_HELP, "unsigned": UNSIGNED_HELP})
def publish(c, spec=DEMO, push=False, wait=False, signing_key=None, unsigned=False):
    """Stage publish: plan the Hub upload of every repo (files to add, change, delete); --push
    uploads and tags.

    Refuses weight files that the verification manifest does not list as passed with the same
    bytes. Token from HF_TOKEN or `hf auth login`. Re-run an interrupted push to resume it."""
    from release import pipeline
    from release import publish as stage

    _signing_key(signing_key)
    s, result = _stage(spec, stage.STAGE, push=push, wait=wait, unsigned=unsigned)
    pipeline.summary(s, [result])
    if not push:
        print("plan only: nothing was uploaded; add --push to publish")


@task(help={
    "spec": f"release spec (default {DEMO})",
    "force": "rebuild stages even when up to date",
    "only": "run only this stage",
    "from": "start at this stage (earlier stages must be built)",
    "push": "after the plan, upload every repo to the Hub and tag it (default: plan only)",
    "runner": "docker: each stage in its image (data, cpt, sft in the train image; the rest in the release "
              "image); local: here (default)",
    "wait": WAIT_HELP,
    "check": "hash every built file again and rebuild the stages whose bytes changed (a plain run hashes only "
             "files modified since their stage was built)",
    "signing-key": SIGNING_HELP,
    "unsigned": UNSIGNED_HELP,
    **LAUNCH_HELP,
})
def release(c, spec=DEMO, force=False, only=None, from_=None, push=False, runner="local", processes=1, nodes=1,
            rdzv=None, wait=False, check=False, signing_key=None, unsigned=False, join_timeout=600):
    """Run the release pipeline: base, data, cpt, sft, merge, bnb4, gguf, modelfiles, verify, cards, publish."""
    import time

    from release import pipeline
    from training import distributed

    _signing_key(signing_key)
    s = _spec(spec)
    how = _guarded(lambda: distributed.launch(processes, nodes, rdzv, join_timeout))
    start = time.perf_counter()
    results = _guarded(lambda: pipeline.run(s, force=force, only=only, start=from_, push=push, launch=how,
                                            runner=runner, root=ROOT, wait=wait, check=check, unsigned=unsigned))
    pipeline.summary(s, results, artifacts=True)
    print(f"{s.release.name} {s.release.version}: {len(results)} stages in {time.perf_counter() - start:.0f} s"
          + ("" if push else "; nothing left this machine (add --push to publish)"))


@task(help={"out": "where to write the private key (its public key goes to OUT.pub); never overwritten"})
def keygen(c, out=None):
    """Make an EC P-256 signing key pair for the release's signatures (OpenSSF model signing).

    The private key (mode 0600; encrypted when QALB_SIGNING_KEY_PASSWORD is set) stays with the
    maintainers; OUT.pub is published in every repo, and its fingerprint should also be published
    somewhere else the maintainers control."""
    from release import signing

    if not out:
        _refuse("keygen: --out KEY is needed (where to write the private key; KEY.pub beside it)")
    pub, fp = _guarded(lambda: signing.keygen(Path(out)))
    print(f"private key {out} (keep it secret; sign with --signing-key {out} or QALB_SIGNING_KEY)")
    print(f"public key  {pub}")
    print(f"fingerprint {fp}  (publish it where users can compare it: `sha256sum {pub.name}`)")


@task(positional=["repo"], help={"repo": "the repo: a Hub id (owner/name) or a local folder",
            "revision": "branch, tag or commit on the Hub (default main)",
            "file": "check this one file (e.g. a GGUF) with its own <file>.sig",
            "key": "the maintainers' public key (default: the repo's own signing-key.pub, with a note)",
            "identity": "Sigstore keyless: the signer's identity (e.g. an e-mail) instead of --key",
            "issuer": "Sigstore keyless: the identity's OIDC issuer"})
def check(c, repo=None, revision=None, file=None, key=None, identity=None, issuer=None):
    """Check a published repo (Hub id or local folder): its signature, every file's sha256, and its
    provenance (subjects, and the adapters it names against their repos). Exits 1 on any failure."""
    from rich.table import Table

    from release import check as checking
    from release.artifacts import summary_console

    if _help_asked("check", repo):
        return
    if not repo:
        _refuse("check: name the repo (a Hub id such as owner/name, or a local folder)")
    report = _guarded(lambda: checking.check(repo, revision=revision, file=file, key=Path(key) if key else None,
                                             identity=identity, issuer=issuer, adapters=not Path(repo).is_dir()))
    table = Table(title=f"{repo}{f'@{revision}' if revision else ''}")
    for col in ("file", "digest", "signed by", "built from"):
        table.add_column(col)
    for r in report.rows:
        table.add_row(r.file, "ok" if r.ok else "DIFFERS", r.signer, r.built_from)
    summary_console().print(table)
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    for line in report.failures:
        print(f"error: {line}", file=sys.stderr)
    if not report.passed:
        raise Exit(code=1)
    print(f"{repo}: {len(report.rows)} files match their signature and provenance")


@task(positional=["repo"], help={"repo": "the repo to rebuild: a Hub id (owner/name)",
            "revision": "branch, tag or commit on the Hub (default main)",
            "key": "the maintainers' public key (default: the repo's own signing-key.pub)",
            "spec": "the release spec (default: the one in specs/ with the recorded sha256)",
            "build": "fresh folder to build in (default build/reproduce/<repo name>)"})
def reproduce(c, repo=None, revision=None, key=None, spec=None, build=None):
    """Rebuild a published variant from its provenance (base, adapters, spec at their recorded
    digests) and compare every weight file's sha256 with the published one. Exits 1 on a difference."""
    from rich.table import Table

    from release import reproduce as rebuild
    from release.artifacts import summary_console

    if _help_asked("reproduce", repo):
        return
    if not repo:
        _refuse("reproduce: name the repo to rebuild (a Hub id such as owner/name)")
    folder = Path(build) if build else ROOT / "build" / "reproduce" / repo.split("/")[-1]
    from release import pipeline

    rows, report = _guarded(lambda: rebuild.reproduce(repo, pipeline.rebuild, revision=revision,
                                                      key=Path(key) if key else None,
                                                      spec_path=Path(spec) if spec else None, build=folder))
    table = Table(title=f"{repo} rebuilt in {folder}")
    for col in ("file", "published sha256", "rebuilt sha256", "same"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.file, r.published[:16] + "…", (r.rebuilt or "-")[:16] + "…", "yes" if r.same else "NO")
    summary_console().print(table)
    for line in report.failures:
        print(f"error: {line}", file=sys.stderr)
    if not report.passed:
        raise Exit(code=1)
    print(f"{repo}: {len(rows)} weight files rebuilt byte for byte")


def _docker_build(c, image="release", tag=None, base_image=None, wheelhouse=None, ca_bundle=None, build_arg=None):
    """Build a container image: `release` (CPU: merge, GGUF, verify, publish) or `train` (CUDA, Unsloth)."""
    import os

    from rich.table import Table

    from release import docker
    from release.artifacts import human_bytes, summary_console
    from release.errors import UsageError

    def build():
        extra = {}
        for item in build_arg or []:
            key, eq, value = item.partition("=")
            if not (key and eq):
                raise UsageError(f"--build-arg {item}: expected KEY=VALUE")
            extra[key] = value
        ca = ca_bundle or os.environ.get("PIP_CERT")
        return docker.build(image, ROOT, tag=tag or None, base_image=base_image, extra=extra,
                            wheelhouse=Path(wheelhouse) if wheelhouse else None, ca_bundle=Path(ca) if ca else None)

    info = _guarded(build)
    table = Table(title="docker build")
    for col in ("image", "tag", "size", "seconds"):
        table.add_column(col)
    table.add_row(info["image"], info["tag"], human_bytes(info["bytes"]) if info["bytes"] else "?",
                  str(info["seconds"]))
    summary_console().print(table)


def _hub_serve(c, port=8999, root="build/localhub", token=None, host="127.0.0.1"):
    """Serve a local Hugging Face Hub (repos kept in a folder) until Ctrl-C; point HF_ENDPOINT at it."""
    import os

    from release import localhub

    secret = token or os.environ.get("HF_TOKEN") or None  # never printed
    _guarded(lambda: localhub.serve(Path(root), port=int(port), host=host, tokens=(secret,) if secret else None))


# The task namespace: every task above, plus `docker.*` and `hub.*`.
ns = Collection.from_module(sys.modules[__name__])
ns.add_collection(Collection("docker", task(name="build", iterable=["build_arg"], help={
    "image": "release (CPU) or train (CUDA + Unsloth)",
    "tag": "image tag (default qalb-<image>:<package version>, what --runner docker runs)",
    "base-image": "BASE_IMAGE build argument (default: the Dockerfile's pinned image)",
    "wheelhouse": "folder of pre-built wheels pip may use (e.g. llama-cpp-python's)",
    "ca-bundle": "CA bundle for pip's HTTPS in the build (default: $PIP_CERT, if set)",
    "build-arg": "KEY=VALUE passed to docker build; repeatable (e.g. TORCH_INDEX_URL=...)",
})(_docker_build)))
ns.add_collection(Collection("hub", task(name="serve", auto_shortflags=False, help={  # -h stays --help
    "port": "port to listen on (default 8999; 0: any free port)",
    "root": "folder holding the repos (default build/localhub)",
    "token": "write token clients must send (default, and safer than this option, which others can see in ps: "
             "$HF_TOKEN; with neither, any bearer token)",
    "host": "address to listen on (default 127.0.0.1)",
})(_hub_serve)))
