"""Tasks of the Qalb release toolchain (`./inv --list`). Thin: parse arguments, call release/."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from invoke import Collection, Exit, task

DEMO = "specs/demo.toml"
RUNNER_HELP = "docker: run in the task's container image; local: here (default: docker for training on a GPU host)"
LAUNCH_HELP = {
    "processes": "training processes per host (DDP through torchrun: one per GPU; default 1)",
    "nodes": "hosts taking part (each runs the same command; default 1)",
    "rdzv": "HOST:PORT where the hosts meet (torchrun's c10d rendezvous; needed with --nodes > 1)",
}


def _guarded(fn: Callable[[], object]) -> object:
    """Run ``fn`` (with the libraries' known-harmless notices dropped: release/quiet.py); turn the
    toolchain's own errors into one line each on stderr and exit 2."""
    from release.errors import ReleaseError
    from release.quiet import known_notices

    try:
        with known_notices():
            return fn()
    except ReleaseError as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        raise Exit(code=2) from None
    except KeyboardInterrupt:
        print("interrupted: finished stages are kept; re-run to resume", file=sys.stderr)
        raise Exit(code=130) from None


def _spec(path: str):
    from release import spec

    return _guarded(lambda: spec.load(path))


def _runner(name: str, runner: str | None, **options: object) -> bool:
    """With the docker runner, run task ``name`` with ``options`` in its container and return True."""
    from release import docker

    def build_dir() -> Path | None:
        return _spec(str(options["spec"])).build_dir if options.get("spec") else None

    return bool(_guarded(lambda: docker.dispatch(name, runner, options, Path(__file__).parent,
                                                 build_dir=build_dir() if runner != "local" else None)))


@task(help={"slow": "also run the opt-in slow tests", "k": "only tests matching this expression",
            "gpu": "run only the GPU tests (CUDA kernels, NCCL, the train image with --gpus all): on a GPU host",
            "args": "extra arguments for pytest"})
def test(c, slow=False, k="", gpu=False, args=""):
    """Run the test suite (tiny models, CPU only, offline); --gpu: the GPU tests instead."""
    cmd = [sys.executable, "-m", "pytest", "-q"]
    if slow:
        cmd.append("--slow")
    if gpu:
        cmd += ["--gpu", "-m", "gpu"]
    if k:
        cmd += ["-k", repr(k)]
    c.run(" ".join(cmd + ([args] if args else [])), pty=False)


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
        print(f"  disk estimate: needs {s.base.model}'s config.json (not cached; `./inv release --only base` "
              "fetches the base)")
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
    "spec": f"release spec whose base model to build (default {DEMO})",
    "out": "write a standalone model to this folder instead of the spec's build folder",
    "shape": "with --out: 'spec' (the spec's [base.scaffold]) or '8b' (Llama 3.1 8B layer shapes)",
    "layers": "with --shape 8b: number of layers",
    "seed": "with --out: random seed",
    "force": "rebuild even if up to date",
    "runner": RUNNER_HELP,
})
def scaffold(c, spec=DEMO, out=None, shape="spec", layers="2", seed="0", force=False, runner=None):
    """Build a random-init Llama-3 base model (real Llama 3 tokenizer).

    By default the spec's [base.scaffold] into its build folder; with --out a standalone model,
    e.g. one with Llama 3.1 8B layer shapes for benchmarks."""
    from dataclasses import replace

    from release import base, pipeline
    from release import scaffold as kit

    if _runner("scaffold", runner, spec=spec, out=out, shape=shape, layers=layers, seed=seed, force=force):
        return
    s = _spec(spec)
    if out is None:
        if s.base.scaffold is None:
            print(f"error: {spec}: has no [base.scaffold]; give --out to build a standalone model",
                  file=sys.stderr)
            raise Exit(code=2)
        manifest = _guarded(lambda: base.run(s, force=force))
        pipeline.summary(s, [pipeline.StageResult(base.STAGE, base.folder(s), manifest)])
        return
    if not (str(layers).isdigit() and int(layers) > 0 and str(seed).isdigit()):
        print(f"error: --layers {layers} --seed {seed}: expected a positive layer count and a seed >= 0", file=sys.stderr)
        raise Exit(code=2)
    if shape == "8b":
        sc = kit.eight_b_shaped(int(layers), int(seed))
    elif shape == "spec" and s.base.scaffold is not None:
        sc = replace(s.base.scaffold, seed=int(seed))
    else:
        print(f"error: --shape {shape}: expected 'spec' (with a [base.scaffold]) or '8b'", file=sys.stderr)
        raise Exit(code=2)
    from release.artifacts import run_stage

    # built aside and swapped in with a manifest, like every stage: an interrupted run leaves no model
    manifest = _guarded(lambda: run_stage(
        "scaffold", Path(out), lambda tmp: kit.write_model(tmp, sc, s.chat, max_shard_bytes=s.max_shard_bytes,
                                                          progress=True),
        release=s.release.name, spec_sections={"scaffold": kit.describe(sc)}, force=force))
    f = manifest.figures
    print(f"{out}: {f['parameters']:,} parameters, {pipeline.human_bytes(f['bytes'])} in {f['shards']} shard(s)")


@task(help={
    "spec": f"release spec (default {DEMO})",
    "force": "rebuild stages even when up to date",
    "only": "run only this stage",
    "from": "start at this stage (earlier stages must be built)",
    "push": "after the plan, upload every repo to the Hub and tag it (default: plan only)",
    "runner": "docker: each stage in its image (data, cpt, sft in the train image; the rest in the release "
              "image); local: here (default)",
    **LAUNCH_HELP,
})
def release(c, spec=DEMO, force=False, only=None, from_=None, push=False, runner="local", processes=1, nodes=1,
            rdzv=None):
    """Run the release pipeline: data, cpt, sft, merge, bnb4, gguf, verify, modelfiles, cards, hub."""
    import time

    from release import pipeline
    from training import distributed

    s = _spec(spec)
    how = _guarded(lambda: distributed.launch(processes, nodes, rdzv))
    start = time.perf_counter()
    results = _guarded(lambda: pipeline.run(s, force=force, only=only, start=from_, push=push, launch=how,
                                            runner=runner, root=Path(__file__).parent))
    pipeline.summary(s, results, artifacts=True)
    print(f"{s.release.name} {s.release.version}: {len(results)} stages in {time.perf_counter() - start:.0f} s"
          + ("" if push else "; nothing left this machine (add --push to publish)"))


@task(help={
    "spec": "release spec (default specs/qalb.toml)",
    "out": "folder for the Modelfiles (default modelfiles/)",
    "check": "validate this Modelfile with Ollama's grammar instead of writing",
    "runner": RUNNER_HELP,
})
def modelfiles(c, spec="specs/qalb.toml", out="modelfiles", check=None, runner=None):
    """Write the modelfiles stage's files (one Ollama Modelfile per GGUF type, named after its tag,
    the hf.co template/system/params files and the LICENSE), or --check one Modelfile."""
    from release import modelfile

    if _runner("modelfiles", runner, spec=spec, out=out, check=check):
        return

    if check:
        mf = _guarded(lambda: modelfile.check_file(Path(check)))
        print(f"{check}: ok: FROM {mf.model}; {len(mf.parameters)} parameters "
              f"({', '.join(mf.parameters)}); template {'set' if mf.template else 'not set'}; "
              f"system {'set' if mf.system else 'not set'}")
        return
    s = _spec(spec)
    written = _guarded(lambda: modelfile.write_all(s, Path(out)))
    for qtype in s.gguf_types():
        path = Path(out) / modelfile.modelfile_name(s, qtype)
        print(f"{path}: {s.ollama.model}:{s.ollama.tags[qtype]} from {s.gguf_file_name(qtype)}")
    print(f"{len(written)} files in {out}: " + ", ".join(p.name for p in written if p.suffix != ".Modelfile"))


@task(iterable=["adapter"], help={
    "spec": f"release spec (default {DEMO})",
    "base": "base model folder (default: the spec's built base stage)",
    "adapter": "PEFT adapter folder; repeat for several, applied in order (CPT, then SFT)",
    "out": "output folder (default build/<release>/merge); gets bf16/ and, if the spec has it, fp16/",
    "force": "merge again even if up to date",
    "runner": RUNNER_HELP,
})
def merge(c, spec=DEMO, base=None, adapter=None, out=None, force=False, runner=None):
    """Merge LoRA adapters into the base model: streamed BF16 (and FP16) safetensors."""
    from release import base as base_stage
    from release import merge as merger
    from release import pipeline

    if _runner("merge", runner, spec=spec, base=base, adapter=adapter, out=out, force=force):
        return

    s = _spec(spec)
    if not adapter:
        print("error: give at least one --adapter FOLDER", file=sys.stderr)
        raise Exit(code=2)
    base_dir = Path(base) if base else base_stage.model_dir(s)
    out_dir = Path(out) if out else merger.folder(s)
    manifest = _guarded(lambda: merger.run_merge(s, base_dir, [Path(a) for a in adapter], out_dir, force=force))
    f = manifest.figures
    print(f"{out_dir}: {'built' if manifest.built else 'up to date'}, {len(manifest.outputs)} files")
    print(f"{f['tensors']} tensors ({f['lora_merged']} LoRA merges, {f['replaced']} replaced), "
          f"{pipeline.human_bytes(f['bytes_written'])} written in {f['seconds']} s, peak RSS {f['peak_rss_mb']} MB")


@task(help={"spec": f"release spec (default {DEMO})", "force": "verify again even if up to date"})
def verify(c, spec=DEMO, force=False):
    """Build what verification needs, then run the release gates on every variant (exit 2 on a failure)."""
    from release import pipeline
    from release.artifacts import read_manifest, summary_console

    s = _spec(spec)
    names = pipeline.applicable(s)
    stage = pipeline.verify.STAGE
    before = names[names.index(stage) - 1]
    results = _guarded(lambda: pipeline.run(s, until=before) + pipeline.run(s, only=stage, force=force))
    pipeline.summary(s, results, artifacts=True)
    summary_console().print(pipeline.verify_table(read_manifest(pipeline.folder(s, stage)).figures))
    print(f"{s.release.name} {s.release.version}: every release gate passed")


@task(help={
    "spec": f"release spec (default {DEMO})",
    "model": "HF Llama folder to convert (default: the spec's merged BF16 model)",
    "force": "convert again even if up to date",
    "runner": RUNNER_HELP,
})
def gguf(c, spec=DEMO, model=None, force=False, runner=None):
    """Convert to GGUF (F16/BF16/Q8_0) and quantize with llama.cpp (the spec's quant types)."""
    from rich.table import Table

    from release import gguf as converter
    from release.artifacts import summary_console

    if _runner("gguf", runner, spec=spec, model=model, force=force):
        return

    s = _spec(spec)
    source = Path(model) if model else converter.inputs(s)["model"]
    manifest = _guarded(lambda: converter.run_from(s, source, force=force))
    table = Table(title=f"GGUF files of {s.release.name} ({'built' if manifest.built else 'up to date'})")
    for col in ("type", "file", "size", "bits/weight", "sha256", "seconds"):
        table.add_column(col)
    for row in converter.summary_rows(manifest.figures["files"]):
        table.add_row(*row)
    summary_console().print(table)


@task(help={"spec": f"release spec (default {DEMO})", "force": "write the cards again even if up to date"})
def cards(c, spec=DEMO, force=False):
    """Write the model card of every repo: build/<release>/cards/<variant>/README.md."""
    from release import card, pipeline

    s = _spec(spec)
    manifest = _guarded(lambda: card.run(s, force=force))
    pipeline.summary(s, [pipeline.StageResult(card.STAGE, card.folder(s), manifest)])
    if not manifest.figures.get("verified"):
        print("note: no verification manifest yet, so the variants table has no figures; "
              "run ./inv release --from verify")


@task(help={"spec": f"release spec (default {DEMO})", "push": "upload and tag (default: show the plan only)"})
def push(c, spec=DEMO, push=False):
    """Plan the Hub upload of every repo (files to add, change, delete); --push uploads and tags.

    Refuses weight files that the verification manifest does not list as passed with the same
    bytes. Token from HF_TOKEN or `hf auth login`. Re-run an interrupted push to resume it."""
    from release import hub
    from release.artifacts import summary_console

    s = _spec(spec)
    plans = _guarded(lambda: hub.plan(s))
    if not push:
        print("plan only: nothing was uploaded; add --push to publish")
        return
    results = _guarded(lambda: hub.push(s, plans))
    summary_console().print(hub.push_table(s, results))


@task(help={"spec": f"release spec (default {DEMO})", "force": "curate again even if up to date",
            "runner": RUNNER_HELP})
def data(c, spec=DEMO, force=False, runner=None):
    """Curate the corpora into the CPT and SFT sets with a retention report (build/<release>/data)."""
    from training import curate

    if _runner("data", runner, spec=spec, force=force):
        return

    s = _spec(spec)
    curate.summary(s, _guarded(lambda: curate.run(s, force=force)))


@task(help={"stage": "cpt (continued pre-training) or sft (instruction fine-tuning)",
            "spec": f"release spec (default {DEMO})", "force": "train again even if up to date",
            "runner": RUNNER_HELP, **LAUNCH_HELP})
def train(c, stage, spec=DEMO, force=False, runner=None, processes=1, nodes=1, rdzv=None):
    """Train a LoRA stage with Unsloth (build/<release>/<stage>); an interrupted run resumes."""
    from training import distributed, stages

    how = _guarded(lambda: distributed.launch(processes, nodes, rdzv))
    if _runner("train", runner, stage=stage, spec=spec, force=force, processes=how.processes, nodes=how.nodes,
               rdzv=how.rdzv):
        return

    s = _spec(spec)
    stages.summary(s, stage, _guarded(lambda: distributed.run(s, stage, how, force=force)))


def _docker_build(c, image="release", tag=None, base_image=None, wheelhouse=None, ca_bundle=None, build_arg=None):
    """Build a container image: `release` (CPU: merge, GGUF, verify, publish) or `train` (CUDA, Unsloth)."""
    import os

    from rich.table import Table

    from release import docker, pipeline
    from release.artifacts import summary_console

    extra = {}
    for item in build_arg or []:
        key, eq, value = item.partition("=")
        if not (key and eq):
            print(f"error: --build-arg {item}: expected KEY=VALUE", file=sys.stderr)
            raise Exit(code=2)
        extra[key] = value
    ca = ca_bundle or os.environ.get("PIP_CERT")
    info = _guarded(lambda: docker.build(
        image, Path(__file__).parent, tag=tag or None, base_image=base_image, extra=extra,
        wheelhouse=Path(wheelhouse) if wheelhouse else None, ca_bundle=Path(ca) if ca else None))
    table = Table(title="docker build")
    for col in ("image", "tag", "size", "seconds"):
        table.add_column(col)
    table.add_row(info["image"], info["tag"], pipeline.human_bytes(info["bytes"]) if info["bytes"] else "?",
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
