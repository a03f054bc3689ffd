"""What only a host with NVIDIA GPUs can show, and the one command that shows it: `./inv test --gpu`
(skipped elsewhere, and without --gpu). They drive the train image with `--gpus all`, as the docker
runner does on such a host: PyPI's CUDA torch finds the GPUs, Unsloth takes its CUDA path (bf16,
8-bit AdamW, its Triton kernels: no CPU adaptations), and DDP over NCCL on every GPU keeps the
losses of one GPU with the same global batch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_training import _spec_text

from conftest import ROOT, demo_release
from release import docker, pipeline
from release.artifacts import read_manifest

pytestmark = pytest.mark.gpu
INVOKE = str(Path(sys.executable).with_name("invoke"))


@pytest.fixture(scope="module")
def train_image() -> str:
    tag = docker.image_tag("train")
    if shutil.which("docker") is None or not docker.image_exists(tag):
        pytest.fail(f"image {tag} not found: build it with `./inv docker.build --image release` and "
                    "`./inv docker.build --image train` (docs/containers.md)")
    return tag


def _gpus() -> int:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
    return sum(line.startswith("GPU ") for line in out.splitlines())


def test_train_image_sees_the_gpus_and_unsloth_takes_its_cuda_path(train_image):
    probe = ("import unsloth, torch; from unsloth import FastLanguageModel; "
             "print(torch.cuda.is_available(), torch.cuda.device_count(), torch.version.cuda)")
    out = subprocess.run(["docker", "run", "--rm", "--gpus", "all", "--entrypoint", "python", train_image, "-c", probe],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    available, count, cuda = out.stdout.split()[-3:]
    assert available == "True" and int(count) == _gpus() and cuda.startswith("13"), out.stdout


def _train(folder: Path, tiny_model: Path, processes: int):
    from release import spec

    text = _spec_text().replace("effective_batch_size = 2\nper_device_batch_size = 1\n",
                                "effective_batch_size = 8\nper_device_batch_size = 8\n")
    s = spec.load(demo_release(folder, tiny_model, text))
    for argv in (["data"], ["release", "--only", "cpt", "--processes", str(processes)]):
        done = subprocess.run([INVOKE, *argv, "--spec", str(s.path), "--runner", "docker"], cwd=ROOT,
                              capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "--gpus all" in done.stderr or argv == ["data"]
    return s


def test_cpt_on_the_gpu_and_on_every_gpu(train_image, tiny_model):
    """CPT on one GPU runs the spec as written (no adaptations); on every GPU (DDP, NCCL; a power
    of two up to 8, dividing the global batch of 8) its per-step losses stay within 2% of one
    GPU's: bf16 autocast and the GPU kernels' non-deterministic reductions make the runs differ
    in the low bits of every step, far below the loss's change between steps."""

    work = ROOT / "build" / ".cache" / "gpu-test"
    shutil.rmtree(work, ignore_errors=True)
    one = _train(work / "one", tiny_model, 1)
    m = read_manifest(pipeline.folder(one, "cpt"))
    assert m.figures["device"] == "cuda" and m.figures["adaptations"] == []
    assert m.figures["optimizer"] == "adamw_8bit" and m.figures["bf16"] is True
    n = min(8, 1 << (_gpus().bit_length() - 1))
    if n < 2:
        pytest.skip("one GPU: DDP over NCCL needs two")
    many = _train(work / "many", tiny_model, n)
    assert read_manifest(pipeline.folder(many, "cpt")).figures["processes"] == n

    def losses(s) -> list[float]:
        state = json.loads((pipeline.folder(s, "cpt") / "trainer_state.json").read_text(encoding="utf-8"))
        return [e["loss"] for e in state["log_history"] if "loss" in e]

    assert losses(many) == pytest.approx(losses(one), rel=2e-2)
    shutil.rmtree(work, ignore_errors=True)
