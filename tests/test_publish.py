"""Publishing with the real huggingface_hub client against the local Hub (release/localhub.py):
plan, push, re-push (nothing sent), interrupted push resumed, downloads loaded back in their
runtimes, refusals of unverified files, and a token that never leaks."""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants, hf_hub_download, snapshot_download
from huggingface_hub.utils.sha import git_hash
from test_merge import make_adapter

from conftest import ROOT, SPECS, write_spec
from release import cards, chart, chat, merge, modelfiles, pipeline, publish, signing
from release.artifacts import read_manifest, run_stage, sha256_file
from release.localhub import HubServer
from release.spec import load

TOKEN = "hf_" + secrets.token_hex(16)  # made per run, recognisable: scanned for everywhere below


def _test_spec_text(build: Path) -> str:
    """The demo spec with two GGUF types (F16, Q4_K_M) to keep the build short (and without the
    bitsandbytes variant where its stage, release/bnb4.py, is not there)."""
    text = (SPECS / "demo.toml").read_text(encoding="utf-8")
    text = text.replace('dir = "../build"', f'dir = "{build}"')
    text, n = re.subn(r"^quant_types = \[.*\]$", 'quant_types = ["Q4_K_M"]', text, flags=re.M)
    assert n == 1, "test setup: no quant_types line in demo.toml"
    text = re.sub(r'^(?!F16 |Q4_K_M )[A-Z]\w* = "tiny-instruct-.*\n', "", text, flags=re.M)  # the others' tags
    # Gates for the random-weight demo model, which 4-bit quantization moves far (measured by the
    # verify stage: KL ~0.93 and ~27% equal top-1 for Q4_K_M and NF4; F16 KL 0.00013, 99.7%).
    # These tests are about publishing what passed, not about fidelity (test_gguf.py, test_verify).
    for name, (kld, top1) in {"F16": (0.001, 0.97), "Q4_K_M": (2.0, 0.1), "bnb4": (2.0, 0.1)}.items():
        text = re.sub(rf"\[gates\.{name}\]\nmax_kld = .*\nmin_top1 = .*\n",
                      f"[gates.{name}]\nmax_kld = {kld}\nmin_top1 = {top1}\n", text)
    # verification answers: 4 greedy tokens instead of 32, and the stop and purity gates not
    # enforced: this model is the random base with one adapter merged by hand, untrained (the
    # fidelity figures do not depend on it)
    text, n = re.subn(r"^max_new_tokens = 32 .*$", "max_new_tokens = 4", text, flags=re.M)
    assert n == 1, "test setup: no max_new_tokens line in demo.toml"
    text = text.replace("enforce_urdu_purity = true", "enforce_urdu_purity = false")
    text = text.replace("enforce_stop_token = true", "enforce_stop_token = false")
    # one adapter merged by hand, no training stages: no adapter repos (tests/test_signing.py has them)
    return text.replace("publish_adapters = true", "publish_adapters = false")


def write_verify_manifest(spec) -> None:
    """The verification manifest of the built release, by the real verify stage (every variant
    loaded and run in its runtime, measured against BF16, sha256 of every weight file)."""
    pipeline.run_one(spec, "verify", progress=False)


def _inputs(spec) -> dict:
    return pipeline.upstream(spec, publish.STAGE)


def _plan(spec) -> list:
    return publish.plan(spec, _inputs(spec), progress=False)


@pytest.fixture(scope="module", autouse=True)
def signing_key(tmp_path_factory):
    """The release's signing key (QALB_SIGNING_KEY) for this module: cards name it, plans are signed."""
    key = tmp_path_factory.mktemp("key") / "release.key"
    signing.keygen(key)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(signing.ENV_KEY, str(key))
        yield key


@pytest.fixture(scope="module")
def release_build(tmp_path_factory, tokenizer_cache, signing_key):
    """The demo release built once: scaffold base, one LoRA adapter merged to BF16/FP16, GGUF
    F16 + Q4_K_M, Modelfiles, verification manifest, cards. Returns the spec."""
    root = tmp_path_factory.mktemp("release")
    build = root / "build"
    build.mkdir()
    (build / ".cache").symlink_to(tokenizer_cache)  # the session's Llama 3 tokenizer, built once
    spec = load(write_spec(root / "spec", _test_spec_text(build)))
    pipeline.run_one(spec, "base", progress=False)
    adapter = make_adapter(pipeline.base_model_dir(spec), root / "adapter", seed=7, modules_to_save=["lm_head"])
    merge.run_merge(spec, pipeline.base_model_dir(spec), [adapter], pipeline.folder(spec, "merge"), progress=False)
    pipeline.run_one(spec, "bnb4", progress=False)
    pipeline.run_one(spec, "gguf", progress=False)
    pipeline.run_one(spec, "modelfiles", progress=False)
    write_verify_manifest(spec)
    pipeline.run_one(spec, "cards", progress=False)
    return spec


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """A fresh local Hub; HF_ENDPOINT and HF_TOKEN point at it, online mode for this test only."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with HubServer(tmp_path / "hub", tokens=(TOKEN,), page_size=3) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


SIGNED = (signing.SIGNATURE, signing.PROVENANCE, signing.PUBLIC_KEY)  # in every repo of a signed release


def _repos(spec) -> dict[str, str]:
    return {name: v.repo for name, v in spec.variants.items()}


# --- plan ---------------------------------------------------------------------------------------


def test_plan_without_endpoint_stages_the_exact_file_sets(release_build, monkeypatch, capsys):
    spec = release_build
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    plans = {p.variant: p for p in publish.plan(spec, _inputs(spec), progress=False)}
    out = " ".join(capsys.readouterr().out.split())  # rich wraps lines at the terminal width
    assert "HF_ENDPOINT is not set: compared with an empty remote (nothing was contacted)" in out
    b = spec.build_dir
    gguf_repo = plans["gguf"]
    assert sorted(gguf_repo.files) == sorted([
        "Qalb-Demo-1.0-Tiny-Instruct-F16.gguf", "Qalb-Demo-1.0-Tiny-Instruct-Q4_K_M.gguf", "README.md", "LICENSE",
        "NOTICE", chart.FILE, "template", "system", "params", "tiny-instruct-fp16.Modelfile",
        "tiny-instruct-q4_K_M.Modelfile", "Qalb-Demo-1.0-Tiny-Instruct-F16.gguf.sig",
        "Qalb-Demo-1.0-Tiny-Instruct-Q4_K_M.gguf.sig", *SIGNED])
    bf16 = plans["bf16"]
    assert sorted(bf16.files) == sorted(["LICENSE", "NOTICE", "README.md", *SIGNED]
                                        + [p.name for p in (b / "merge" / "bf16").iterdir()])
    for p in plans.values():  # the licence's attribution notice (§1.b.iii), in every repo
        assert (p.folder / "NOTICE").read_text(encoding="utf-8") == spec.license_terms.notice + "\n"
    for p in plans.values():
        assert p.folder == b / "publish" / p.repo.split("/")[-1]
        assert sorted(x.relative_to(p.folder).as_posix() for x in p.folder.rglob("*") if x.is_file()) == sorted(p.files)
        assert p.add == sorted(p.files) and not p.change and not p.delete
    # weights are hard links to the built files, not copies
    staged = gguf_repo.folder / "Qalb-Demo-1.0-Tiny-Instruct-Q4_K_M.gguf"
    assert staged.stat().st_ino == (b / "gguf" / staged.name).stat().st_ino
    assert (bf16.folder / "README.md").read_text(encoding="utf-8") == (b / "cards" / "bf16" / "README.md").read_text(
        encoding="utf-8")
    assert json.loads((b / "publish" / "plan.json").read_text())["repos"].keys() == set(_repos(spec).values())
    with pytest.raises(publish.PublishError) as e:
        publish.push(spec, _plan(spec), progress=False)
    assert str(e.value) == (f"{spec.path}: hub.endpoint is 'local' and HF_ENDPOINT is not set; start a local Hub "
                            "(./inv hub.serve --root DIR) and set HF_ENDPOINT to its URL")


# --- push, re-push, download --------------------------------------------------------------------


def test_publish_republish_download_and_load(release_build, local_hub, tmp_path):
    spec, server = release_build, local_hub
    results = {r.repo: r for r in publish.push(spec, _plan(spec), progress=False)}
    assert set(results) == set(_repos(spec).values())
    api = HfApi(endpoint=server.url, token=TOKEN)
    lfs_total = 0
    for _name, repo in _repos(spec).items():
        r = results[repo]
        assert r.commit_url == f"{server.url}/{repo}/commit/{r.oid}"
        refs = api.list_repo_refs(repo)
        assert [(t.name, t.target_commit) for t in refs.tags] == [("v1.0", r.oid)]
        staged = pipeline.folder(spec, "publish") / repo.split("/")[-1]
        remote = {f.path: f for f in api.list_repo_tree(repo, recursive=True)}  # paginated: 3 per page
        local = sorted(x.relative_to(staged).as_posix() for x in staged.rglob("*") if x.is_file())
        assert sorted(remote) == sorted(local + [".gitattributes"])
        for path in local:
            if path.endswith((".safetensors", ".gguf")):
                assert remote[path].lfs.sha256 == sha256_file(staged / path)
            else:  # small files are committed inline: same git blob id
                assert remote[path].lfs or remote[path].blob_id == git_hash((staged / path).read_bytes())
        lfs_total += sum(f.lfs.size for f in remote.values() if f.lfs)  # weights, and tokenizer.json (> 10 MB)
    commits = server.stats["commits"]
    assert len(commits) == len(_repos(spec)) and all(c[1] == "Qalb-Demo-1.0-Tiny-Instruct 1.0" for c in commits)
    assert server.stats["lfs_bytes"] == lfs_total  # each LFS file sent exactly once

    # Re-publishing: the plan finds everything unchanged; no upload, no commit, tags stay.
    server.reset_stats()
    plans = publish.plan(spec, _inputs(spec), progress=False)
    assert all(not p.add and not p.change and not p.delete and p.unchanged for p in plans)
    again = publish.push(spec, plans, progress=False)
    assert all(r.commit_url is None and r.files == 0 for r in again)
    assert server.stats["lfs_bytes"] == 0 and server.stats["commits"] == []
    assert server.stats["requests"]["POST lfs_batch"] == 0 and server.stats["requests"]["POST preupload"] == 0
    assert server.stats["requests"]["POST create_tag"] == 0

    # Download each variant at the release tag and load it in its runtime.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from release import verify

    ids = None
    for name, repo in _repos(spec).items():
        v = spec.variants[name]
        if v.format == "gguf":
            for q in spec.gguf_types():  # one file at a time, as `ollama run hf.co/...:Q4_K_M` does
                path = hf_hub_download(repo, spec.gguf_file_name(q), revision="v1.0", endpoint=server.url,
                                       cache_dir=tmp_path / "cache")
                assert sha256_file(Path(path)) == sha256_file(pipeline.variant_dir(spec, name) / spec.gguf_file_name(q))
                llm = verify.load_gguf(Path(path), n_ctx=64)
                assert llm.n_vocab() == 128256 and llm.tokenize(b"Lahore", add_bos=False) == ids
                llm.eval(ids)  # runs
                assert np.isfinite(llm.scores[len(ids) - 1]).all()
                llm.close()
            readme = hf_hub_download(repo, "README.md", revision="v1.0", endpoint=server.url,
                                     cache_dir=tmp_path / "cache")
            assert ModelCard.load(readme).data.base_model_relation == "quantized"
            continue
        folder = snapshot_download(repo, revision="v1.0", endpoint=server.url, cache_dir=tmp_path / "cache")
        model = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        ids = tok("Lahore", add_special_tokens=False)["input_ids"]
        want = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(v.dtype)
        if want is not None:
            assert model.dtype == want
            local = pipeline.variant_dir(spec, name)
            ref = AutoModelForCausalLM.from_pretrained(local)
            for (k, a), (_, c) in zip(model.state_dict().items(), ref.state_dict().items(), strict=True):
                assert torch.equal(a, c), k  # the downloaded weights are the built ones, bit for bit
        else:  # bitsandbytes 4-bit, loaded by transformers from the repo's quantization_config
            assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
        with torch.no_grad():
            assert torch.isfinite(model(torch.tensor([ids])).logits).all()
        card_data = ModelCard.load(Path(folder) / "README.md").data
        assert card_data.base_model == (spec.base.model if v is spec.flagship else spec.flagship.repo)

    # The flagship card's transformers snippet, pasted as it is into a fresh Python against the Hub.
    readme = (pipeline.folder(spec, "publish") / spec.flagship.repo.split("/")[-1]
              / "README.md").read_text(encoding="utf-8")
    snippet = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    # only change: 8 new tokens instead of 256 (BF16 on this CPU: ~0.3 s per token under load)
    assert "max_new_tokens=256," in snippet
    snippet = snippet.replace("max_new_tokens=256,", "max_new_tokens=8,")
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home")}
    env.pop("HF_TOKEN", None)  # a public repo: no token needed
    server.reset_stats()
    ran = subprocess.run([sys.executable, "-c", snippet], env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert server.stats["requests"]["GET lfs_download"] >= 2  # the weights came from the (local) Hub


# Run before a card's llama-cpp-python snippet, not part of it: this machine's CPU reports AMX
# without the OS enabling it, and llama.cpp's repacked AMX kernels crash there (see
# verify.load_gguf, which does the same).
NO_REPACK = """
import llama_cpp.llama as _module
_defaults = _module.llama_cpp.llama_model_default_params
def _no_repack():
    params = _defaults()
    params.use_extra_bufts = False
    return params
_module.llama_cpp.llama_model_default_params = _no_repack
"""


def _block(readme: str, lang: str, containing: str) -> str:
    return next(b for b in re.findall(rf"```{lang}\n(.*?)```", readme, re.S) if containing in b)


def test_gguf_card_commands_run_as_printed(release_build, local_hub, tmp_path):
    """The GGUF card, downloaded from the Hub, run as a user would: its llama-cpp-python snippet
    (the Python form of the card's llama-cli command: the same repo, quant, context and sampling,
    formatted with the GGUF's own template) and the download of a Modelfile next to its GGUF file,
    which the Modelfile check accepts. (The transformers snippet runs in
    test_publish_republish_download_and_load; llama-cli, llama-server and Ollama are not
    installed here.)"""
    spec, server = release_build, local_hub
    publish.push(spec, _plan(spec), progress=False)
    repo = spec.variants["gguf"].repo
    readme = Path(hf_hub_download(repo, "README.md", endpoint=server.url, cache_dir=tmp_path / "cache")).read_text(
        encoding="utf-8")
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("HF_TOKEN", None)  # a public repo: no token needed

    # llama-cpp-python: only change, 8 new tokens instead of 256; then what it formatted
    snippet = _block(readme, "python", "from llama_cpp import Llama")
    assert f"n_ctx={spec.ollama.num_ctx}" in snippet and "max_tokens=256," in snippet
    snippet = snippet.replace("max_tokens=256,", "max_tokens=8,")
    probe = 'print("FORMAT", llm.chat_format, out["usage"]["prompt_tokens"])\n'
    server.reset_stats()
    ran = subprocess.run([sys.executable, "-c", NO_REPACK + snippet + probe], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert server.stats["requests"]["GET lfs_download"] >= 1  # the GGUF came from the (local) Hub
    fmt, prompt_tokens = ran.stdout.strip().splitlines()[-1].split()[1:]
    # the GGUF's Jinja template, not a built-in format: the prompt holds the default Urdu system
    # prompt, token for token what the release's template renders (the transformers tokenizer)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pipeline.variant_dir(spec, "bf16"))
    text = chat.render(spec.chat, [{"role": "user", "content": cards.QUESTION}])
    assert spec.chat.system_prompt in text
    assert (fmt == "chat_template.default"
            and int(prompt_tokens) == len(tok(text, add_special_tokens=False)["input_ids"]))

    # Ollama from a local copy: the card's download line as printed, then the Modelfile check
    lines = _block(readme, "bash", "ollama create").splitlines()
    download = next(line for line in lines if line.startswith("hf download "))
    got = subprocess.run(download, shell=True, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert got.returncode == 0, got.stderr[-2000:]
    q = cards.default_quant(spec)
    folder = tmp_path / download.split("--local-dir ")[1]
    mf = folder / spec.modelfile_name(q)
    assert f"ollama create {spec.ollama.model}:{spec.ollama.tags[q]} -f {mf.name}" in lines
    from test_tasks import inv

    checked = inv("modelfiles", "--check", str(mf))
    assert checked.returncode == 0, checked.stderr
    assert f"ok: FROM ./{spec.gguf_file_name(q)}" in checked.stdout
    assert (folder / spec.gguf_file_name(q)).is_file()  # FROM names the file downloaded next to it
    assert modelfiles.check_file(mf).parameters["num_ctx"] == spec.ollama.num_ctx


def test_changed_file_is_the_only_one_sent_and_stale_remote_files_are_deleted(release_build, local_hub):
    spec, server = release_build, local_hub
    publish.push(spec, _plan(spec), progress=False)
    api = HfApi(endpoint=server.url, token=TOKEN)
    gguf_repo = spec.variants["gguf"].repo
    api.upload_file(path_or_fileobj=b"old", path_in_repo="old-notes.txt", repo_id=gguf_repo)
    server.reset_stats()
    plans = {p.variant: p for p in publish.plan(spec, _inputs(spec), progress=False)}
    assert plans["gguf"].delete == ["old-notes.txt"] and not plans["gguf"].add
    results = {r.repo: r for r in publish.push(spec, plans.values(), progress=False)}
    assert results[gguf_repo].commit_url is not None and server.stats["lfs_bytes"] == 0
    assert "old-notes.txt" not in api.list_repo_files(gguf_repo)
    tag = next(t for t in api.list_repo_refs(gguf_repo).tags if t.name == "v1.0")
    assert tag.target_commit == results[gguf_repo].oid  # the tag moved to the new commit


# --- interruption -------------------------------------------------------------------------------


PUSH_SCRIPT = """
import sys
from release import pipeline, publish
from release.spec import load
s = load(sys.argv[1])
publish.push(s, publish.plan(s, pipeline.upstream(s, "publish"), progress=False), progress=False)
"""


def _push_process(spec, server) -> subprocess.Popen:
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
           "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", PUSH_SCRIPT, str(spec.path)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_push_killed_mid_file_resumes_without_resending_finished_files(release_build, local_hub):
    spec, server = release_build, local_hub
    b = spec.build_dir
    first_file = sha256_file(b / "gguf" / spec.gguf_file_name("F16"))
    big = b / "gguf" / spec.gguf_file_name("Q4_K_M")
    big_oid = sha256_file(big)
    # The GGUF repo uploads F16, then Q4_K_M, then commits: Q4_K_M stalls halfway, so F16 is
    # uploaded but not committed when the client dies.
    server.faults[big_oid] = {"after": big.stat().st_size // 2}
    proc = _push_process(spec, server)
    assert server.stalled.wait(120), proc.communicate()
    proc.send_signal(signal.SIGKILL)  # the client dies mid-file
    proc.wait(30)
    server.faults.clear()
    server.release_stalls()
    first = server.stats["lfs_uploads"].copy()
    done_before = set(server.stats["lfs_completed"])
    assert big_oid not in done_before and 0 < first[big_oid] <= big.stat().st_size // 2
    assert first_file in done_before

    server.reset_stats()
    proc = _push_process(spec, server)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    resent = set(server.stats["lfs_uploads"])
    # finished files (F16 included, never committed) are not sent again; the interrupted one is,
    # and so is the one LFS file after it in upload order that the first push never reached (the
    # card's chart: a PNG, binary, so LFS)
    chart_oid = sha256_file(b / "cards" / "gguf" / chart.FILE)
    assert chart_oid not in first
    assert resent == {big_oid, chart_oid}
    assert server.stats["lfs_uploads"][big_oid] == big.stat().st_size
    api = HfApi(endpoint=server.url, token=TOKEN)
    gguf_repo = spec.variants["gguf"].repo
    remote = {f.path: f for f in api.list_repo_tree(gguf_repo, recursive=True)}
    assert remote[big.name].lfs.sha256 == big_oid and remote[spec.gguf_file_name("F16")].lfs.sha256 == first_file
    assert [t.name for t in api.list_repo_refs(gguf_repo).tags] == ["v1.0"]


# --- refusals -----------------------------------------------------------------------------------


def _copy_release(spec, tmp_path):
    """A private copy of the built release (hard links), so a test may break it."""
    build = tmp_path / "build"
    shutil.copytree(spec.build_dir.parent, build, copy_function=os.link, symlinks=True)
    text = spec.path.read_text(encoding="utf-8").replace(str(spec.build_dir.parent), str(build))
    return load(write_spec(tmp_path / "spec", text))


def test_refuses_without_verification_manifest(release_build, tmp_path, local_hub):
    spec = _copy_release(release_build, tmp_path)
    shutil.rmtree(spec.build_dir / "verify")
    with pytest.raises(publish.PublishError) as e:
        publish.push(spec, _plan(spec), progress=False)
    assert str(e.value) == (f"{spec.build_dir / 'verify' / 'manifest.json'}: no verification manifest; "
                            "run ./inv release --from verify before publishing")
    assert local_hub.stats["requests"] == {}  # nothing left the machine


def _fail_gate(spec, key: str) -> None:
    """The verification manifest with variant ``key`` failed (as the verify stage records it)."""
    m = read_manifest(spec.build_dir / "verify")
    figures = json.loads(json.dumps(m.figures))
    figures["variants"][key]["passed"] = figures["passed"] = False
    for a in figures["artifacts"].values():
        if (f"gguf:{a['quant']}" if a["quant"] else a["variant"]) == key:
            a["passed"] = False
    run_stage("verify", spec.build_dir / "verify", lambda out: figures, release=spec.release.name, force=True)


def test_refuses_a_failed_gate(release_build, tmp_path, local_hub):
    spec = _copy_release(release_build, tmp_path)
    _fail_gate(spec, "gguf:Q4_K_M")
    with pytest.raises(publish.PublishError) as e:
        publish.plan(spec, _inputs(spec), progress=False)
    q4 = spec.build_dir / "gguf" / spec.gguf_file_name("Q4_K_M")
    assert str(e.value) == (f"{q4}: failed verification (variant gguf Q4_K_M); "
                            "fix it and run ./inv release --from verify")
    assert not list((spec.build_dir / "publish").glob(".*.partial"))  # nothing half-staged is left
    assert local_hub.stats["requests"] == {}


def test_refuses_cards_older_than_the_verification(release_build, tmp_path, local_hub):
    spec = _copy_release(release_build, tmp_path)
    figures = read_manifest(spec.build_dir / "verify").figures
    time.sleep(0.01)
    run_stage("verify", spec.build_dir / "verify", lambda out: figures, release=spec.release.name, force=True)
    with pytest.raises(publish.PublishError) as e:
        publish.plan(spec, _inputs(spec), progress=False)
    assert str(e.value) == f"{spec.build_dir / 'cards'}: cards predate the current verification; run ./inv cards"
    pipeline.run_one(spec, "cards", progress=False)  # the fix the message names
    assert len(publish.plan(spec, _inputs(spec), progress=False)) == len(spec.variants)


def test_refuses_bytes_changed_after_verification(release_build, tmp_path, local_hub):
    spec = _copy_release(release_build, tmp_path)
    target = sorted((spec.build_dir / "merge" / "fp16").glob("*.safetensors"))[-1]
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.unlink()  # break the hard link: the original build stays intact
    target.write_bytes(bytes(data))
    with pytest.raises(publish.PublishError) as e:
        publish.push(spec, _plan(spec), progress=False)
    assert str(e.value).startswith(f"{target}: bytes changed since verification (sha256 ")
    assert str(e.value).endswith("run ./inv release --check to rebuild it from its stage (a plain re-verify would "
                                 "approve the changed file)") and "\n" not in str(e.value)
    assert local_hub.stats["requests"] == {}


# --- the token ----------------------------------------------------------------------------------


def test_token_never_leaks(release_build, tmp_path, local_hub, capfd, caplog):
    spec = _copy_release(release_build, tmp_path)
    caplog.set_level(logging.DEBUG)
    publish.push(spec, _plan(spec), progress=True)  # with progress bars and debug logging
    errors = []
    local_hub.tokens = ("another-token",)  # the server now rejects ours: the error must not echo it
    readme = spec.build_dir / "cards" / "bf16" / "README.md"
    readme.unlink()  # a hard link to the shared build: replace, do not edit in place
    readme.write_text(readme.name + " changed\n", encoding="utf-8")
    try:
        publish.push(spec, _plan(spec), progress=False)
    except publish.PublishError as e:
        errors.append(e)
    assert errors and "401" in str(errors[0]) and "\n" not in str(errors[0])
    # the server's own explanation (huggingface_hub's server_message) and the hint are kept
    assert "Invalid credentials in Authorization header" in str(errors[0])
    assert "check the token (HF_TOKEN or `hf auth login`)" in str(errors[0])
    out, err = capfd.readouterr()
    texts = [out, err, *(r.getMessage() for r in caplog.records), *(str(e) for e in errors),
             *(repr(e.__cause__) for e in errors)]
    assert all(TOKEN not in t for t in texts)
    for f in spec.build_dir.rglob("*"):
        if f.is_file():
            assert TOKEN.encode() not in f.read_bytes(), f
    assert "Bearer" not in out + err


def test_push_without_token_is_refused(release_build, local_hub, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-login"))  # no saved login either
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    with pytest.raises(publish.PublishError, match=r"^no Hugging Face token: set HF_TOKEN or run `hf auth login`$"):
        publish.push(release_build, _plan(release_build), progress=False)


# --- the tasks ----------------------------------------------------------------------------------


def test_cards_and_publish_tasks(release_build, tmp_path, monkeypatch):
    from test_tasks import inv

    spec = _copy_release(release_build, tmp_path)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    cards = inv("cards", "--spec", str(spec.path), "--force")
    assert cards.returncode == 0, cards.stderr
    assert "│ cards " in cards.stdout and "note:" not in cards.stdout
    planned = inv("publish", "--spec", str(spec.path))
    assert planned.returncode == 0, planned.stderr
    assert "compared with an empty remote" in " ".join(planned.stdout.split())
    assert "plan only: nothing was uploaded; add --push to publish" in planned.stdout
    refused = inv("publish", "--spec", str(spec.path), "--push")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.splitlines() == [
        f"error: {spec.path}: hub.endpoint is 'local' and HF_ENDPOINT is not set; start a local Hub "
        "(./inv hub.serve --root DIR) and set HF_ENDPOINT to its URL"]
    shutil.rmtree(spec.build_dir / "verify")
    unverified = inv("publish", "--spec", str(spec.path))
    assert unverified.returncode == 2 and unverified.stderr.splitlines() == [
        f"error: {spec.build_dir / 'verify' / 'manifest.json'}: no verification manifest; "
        "run ./inv release --from verify before publishing"]
