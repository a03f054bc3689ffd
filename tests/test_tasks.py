"""The invoke tasks, run as a user runs them: help, one-line errors, the demo's first stages."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT, SPECS, write_spec


def inv(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


def test_list_shows_the_tasks_with_help():
    out = inv("--list")
    assert out.returncode == 0, out.stderr
    for name in ("modelfiles", "release", "scaffold", "spec", "test", "docker.build", "hub.serve"):
        assert f"  {name} " in out.stdout
    assert "Run the release pipeline" in out.stdout


def test_every_task_answers_help():
    """`./inv TASK --help` prints the task's help (a required positional once swallowed
    `train --help` as its stage)."""
    from tasks import ns

    for name in ns.task_names:
        out = inv(name, "--help")
        assert out.returncode == 0 and out.stdout.startswith(f"Usage: inv[oke] [--core-opts] {name} "), (name, out)
        assert "Options:" in out.stdout and not out.stderr, (name, out.stderr)


def test_usage_errors_are_one_line():
    for args, line in [(("train",), "error: train: give --stage cpt (continued pre-training) or sft (instruction "
                                    "fine-tuning)"),
                       (("train", "--stage", "dpo"), "error: train: --stage dpo: expected cpt (continued pre-training) "
                                                     "or sft (instruction fine-tuning)"),
                       (("cpt", "--nodes", "2"), "error: --nodes 2: give the rendezvous with --rdzv HOST:PORT (a "
                                                 "host every node reaches; the same on every node)"),
                       (("merge", "--out", "x"), "error: --base/--out: give the adapters too (--adapter FOLDER, "
                                                 "repeated); without them the release's stages are merged"),
                       (("scaffold",), "error: scaffold: give --out DIR (a release's base model is built by "
                                       "./inv base)"),
                       (("docker.build", "--build-arg", "X"), "error: --build-arg X: expected KEY=VALUE")]:
        out = inv(*args)
        assert out.returncode == 2 and out.stderr.strip() == line, (args, out.stderr)


def test_spec_task_accepts_the_bundled_specs():
    out = inv("spec")
    assert out.returncode == 0, out.stderr
    assert "specs/qalb.toml: ok: Qalb-1.0-8B-Instruct 1.0 from unsloth/Meta-Llama-3.1-8B" in out.stdout


def test_bad_spec_is_reported_in_one_line_per_problem_without_traceback(tmp_path):
    text = (SPECS / "demo.toml").read_text(encoding="utf-8")
    bad = write_spec(tmp_path, text.replace("r = 64\n", "r = -1\n").replace("top_p = 0.9", "top_p = 2"), "bad.toml")
    for task in ("spec", "release"):
        out = inv(task, "--spec", str(bad))
        assert out.returncode == 2
        assert "Traceback" not in out.stderr
        assert out.stderr.splitlines() == [
            f"error: {bad}: lora.r: expected a positive integer, got -1",
            f"error: {bad}: inference.top_p: expected a number in (0, 1], got 2.0",
        ]


def test_release_runs_one_stage_then_skips_it(tmp_path):
    """The task's options; the whole pipeline runs in tests/test_pipeline.py."""
    spec = write_spec(tmp_path, (SPECS / "demo.toml").read_text(encoding="utf-8").replace('dir = "../build"',
                                                                                          'dir = "out"'))
    first = inv("release", "--spec", str(spec), "--only", "base")
    assert first.returncode == 0, first.stderr
    assert "│ base  │ built " in first.stdout and "modelfiles" not in first.stdout
    assert (tmp_path / "out" / "Qalb-Demo-1.0-Tiny-Instruct" / "base" / "manifest.json").is_file()
    second = inv("release", "--spec", str(spec), "--only", "base")
    assert second.returncode == 0 and "│ base  │ up to date " in second.stdout
    bad = inv("release", "--spec", str(spec), "--only", "nope")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: --only nope: unknown stage (stages: base, data, cpt, sft, merge, bnb4, gguf, modelfiles, verify, "
        "cards, publish)")


def test_standalone_scaffold_is_built_aside_with_a_manifest(tmp_path):
    out = tmp_path / "model"
    done = inv("scaffold", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert (out / "manifest.json").is_file() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no partial folder left
    bad = inv("scaffold", "--out", str(tmp_path / "other"), "--shape", "8b", "--layers", "two")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == "error: --layers two --seed 0: expected a positive layer count and a seed >= 0"
    assert not (tmp_path / "other").exists()


def test_specs_that_used_to_fail_later_are_refused_by_the_spec_task(tmp_path):
    """A pad token outside the Llama 3 table and a control character in the system prompt both
    passed `./inv spec` and then failed with a traceback; now they are refused at load."""
    text = (SPECS / "demo.toml").read_text(encoding="utf-8")
    for name, old, new, key in [
        ("pad.toml", 'pad_token = "<|finetune_right_pad_id|>"', 'pad_token = "<|pad|>"', "chat.pad_token"),
        ("bell.toml", 'system_prompt = "', 'system_prompt = "\\u0007', "chat.system_prompt"),
    ]:
        assert old in text, old
        bad = write_spec(tmp_path, text.replace(old, new, 1), name)
        out = inv("spec", "--spec", str(bad))
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert [line.split(": ")[1:3] for line in out.stderr.splitlines()] == [[str(bad), key]], out.stderr


def test_every_user_error_is_one_family():
    from release import errors

    for name in errors.__all__:
        if name != "Interrupted":
            assert issubclass(getattr(errors, name), errors.ReleaseError), name
    # an interrupt is no error: no ``except Exception`` (or ReleaseError) may swallow it
    assert not issubclass(errors.Interrupted, Exception) and issubclass(errors.Interrupted, BaseException)


def test_a_bad_modelfile_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "Modelfile"
    bad.write_text("FROM x\nPARAMETER temperature hot\n", encoding="utf-8")
    out = inv("modelfiles", "--check", str(bad))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith(f"error: {bad}:2:"), out.stderr
