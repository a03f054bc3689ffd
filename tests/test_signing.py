"""Signed releases a stranger can check (release/signing.py, provenance.py, check.py, reproduce.py).

The signatures are checked with model_signing's own command line, as a downloader without this
toolchain checks them, on downloads made by huggingface_hub from the local Hub: a ``--local-dir``
copy (which adds ``.cache/huggingface/``), the cache's symlinked snapshot, and one GGUF file
alone. ``./inv check`` and ``./inv reproduce`` run as a user types them, against the same Hub,
and every way of handing over other bytes (a changed, added or removed file, another key,
provenance naming other inputs) is refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, linked_copy, release_cmd
from release import pipeline, provenance, signing
from release.artifacts import read_manifest, sha256_file
from release.spec import load

TOKEN = "hf_signing"
MODEL_SIGNING = str(Path(sys.executable).with_name("model_signing"))


def errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error: ")]


def ms_verify(target: Path, sig: Path, pub: Path, *extra: str) -> subprocess.CompletedProcess:
    """``model_signing verify key`` exactly as the cards tell a downloader to run it."""
    return subprocess.run([MODEL_SIGNING, "verify", "key", str(target), "--signature", str(sig),
                           "--public_key", str(pub), *extra], capture_output=True, text=True, timeout=300)


# --- keys and signatures, without a model -------------------------------------------------------


def test_keygen_makes_a_p256_key_never_overwrites_and_bad_keys_are_one_line(tmp_path, monkeypatch):
    key = tmp_path / "k" / "release.key"
    pub, fp = signing.keygen(key)
    assert pub == tmp_path / "k" / "release.key.pub" and oct(key.stat().st_mode & 0o777) == "0o600"
    assert fp == signing.fingerprint(pub.read_bytes()) == signing.load_key(key).fingerprint
    assert fp == "sha256:" + sha256_file(pub)  # what `sha256sum signing-key.pub` prints
    with pytest.raises(signing.SigningError, match="already exists"):
        signing.keygen(key)
    # an encrypted key needs its password, and says so
    monkeypatch.setenv(signing.ENV_PASSWORD, "correct horse")
    locked, _ = signing.keygen(tmp_path / "locked.key")
    signing.load_key(tmp_path / "locked.key")
    monkeypatch.delenv(signing.ENV_PASSWORD)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    rsa_key = tmp_path / "rsa.key"
    rsa_key.write_bytes(rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp_path / "junk.key").write_text("not a key\n")
    for path, why in ((tmp_path / "locked.key", "encrypted; set QALB_SIGNING_KEY_PASSWORD"),
                      (rsa_key, "not an EC P-256"), (tmp_path / "junk.key", "not a PEM private key"),
                      (tmp_path / "missing.key", "cannot read the signing key")):
        with pytest.raises(signing.SigningError) as e:
            signing.load_key(path)
        assert str(e.value).startswith(f"{path}: ") and why in str(e.value) and "\n" not in str(e.value)
    # through the task: one line, exit 2, and the key's path is the only thing named
    done = subprocess.run([*release_cmd(tmp_path / "none.toml", "cards")[:-2], "--signing-key", str(rsa_key)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and errors(done.stderr) == [done.stderr.strip()], done.stderr
    assert "not an EC P-256" in done.stderr


def test_signatures_are_model_signings_own_deterministic_and_bound_to_the_key(tmp_path):
    """A signature made from known digests is the one model_signing's command line makes and
    checks; the same files and key sign to the same bytes (RFC 6979); another key is refused."""
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    (repo / "model.gguf").write_bytes(os.urandom(1000))
    (repo / "sub" / "config.json").write_text("{}\n")
    digests = {"model.gguf": sha256_file(repo / "model.gguf"), "sub/config.json": sha256_file(repo / "sub/config.json")}
    signing.keygen(tmp_path / "a.key")
    signing.keygen(tmp_path / "b.key")
    a, b = signing.load_key(tmp_path / "a.key"), signing.load_key(tmp_path / "b.key")
    signing.sign(repo / "model.sig", "repo", digests, a)
    first = (repo / "model.sig").read_bytes()
    signing.sign(repo / "model.sig", "repo", digests, a)
    assert (repo / "model.sig").read_bytes() == first  # deterministic: a re-run changes nothing on the Hub
    key_file = str(tmp_path / "a.key")
    code = ("import sys; from pathlib import Path; from release import signing; "
            f"signing.sign(Path(sys.argv[1]), 'repo', {digests!r}, signing.load_key(Path({key_file!r})))")
    for seed in ("1", "2"):  # and in another process, whatever its hash seed (protobuf orders JSON keys by it)
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"seed{seed}.sig")], check=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONHASHSEED=seed))
        assert (tmp_path / f"seed{seed}.sig").read_bytes() == first
    signing.sign(tmp_path / "model.gguf.sig", "model.gguf", {".": digests["model.gguf"]}, a)
    ok = ms_verify(repo, repo / "model.sig", tmp_path / "a.key.pub")
    assert ok.returncode == 0 and "Verification succeeded" in ok.stdout, ok.stderr
    alone = ms_verify(repo / "model.gguf", tmp_path / "model.gguf.sig", tmp_path / "a.key.pub")
    assert alone.returncode == 0, alone.stderr
    # what `hf download --local-dir` adds beside the files is not a change
    (repo / ".cache" / "huggingface").mkdir(parents=True)
    (repo / ".cache" / "huggingface" / "model.gguf.metadata").write_text("x\n")
    assert ms_verify(repo, repo / "model.sig", tmp_path / "a.key.pub").returncode == 0
    assert signing.verify(repo / "model.sig", public_key=tmp_path / "a.key.pub").digests == digests
    crlf = tmp_path / "a-crlf.pub"  # a copy with other line endings is the same key, with the same fingerprint
    crlf.write_bytes((tmp_path / "a.key.pub").read_bytes().replace(b"\n", b"\r\n"))
    assert signing.verify(repo / "model.sig", public_key=crlf).signer == a.fingerprint
    wrong = ms_verify(repo, repo / "model.sig", tmp_path / "b.key.pub")
    assert wrong.returncode == 1 and "Key mismatch" in wrong.stderr
    with pytest.raises(signing.SigningError) as e:
        signing.verify(repo / "model.sig", public_key=tmp_path / "b.key.pub")
    assert f"signed by key {a.fingerprint}, not by {b.fingerprint}" in str(e.value)
    (repo / "model.gguf").write_bytes(os.urandom(1000))
    changed = ms_verify(repo, repo / "model.sig", tmp_path / "a.key.pub")
    assert changed.returncode == 1 and "Hash mismatch for" in changed.stderr and "model.gguf" in changed.stderr


def test_keyless_signing_is_wired_to_sigstore_and_fails_in_one_line_offline(tmp_path, monkeypatch):
    """Sigstore keyless signing needs Fulcio, Rekor and an OIDC token: here (offline) it gets as far
    as asking for them, and says in one line what it needs instead of a traceback."""
    monkeypatch.setenv(signing.ENV_KEY, "sigstore")
    monkeypatch.setenv(signing.ENV_IDENTITY_TOKEN, "not-a-real-token")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # nothing listens: fail fast, offline or not
    key = signing.from_environment()
    assert isinstance(key, signing.Keyless) and key.identity_token == "not-a-real-token" and not key.staging
    with pytest.raises(signing.SigningError) as e:
        signing.sign(tmp_path / "model.sig", "repo", {"a": "00" * 32}, key)
    assert "keyless signing through Sigstore failed" in str(e.value) and "\n" not in str(e.value)
    assert "not-a-real-token" not in str(e.value)
    assert not (tmp_path / "model.sig").exists()


# --- the demo release, signed, on the local Hub -------------------------------------------------


@pytest.fixture(scope="module")
def signed(demo_built, tmp_path_factory):
    """The shared demo release, signed and pushed to a local Hub by `./inv release --push
    --signing-key`: (spec, hub, key, public key, tmp folder)."""
    from huggingface_hub import constants

    from release.localhub import HubServer

    tmp = tmp_path_factory.mktemp("signed")
    key = tmp / "keys" / "release.key"
    pub, _ = signing.keygen(key)
    spec_path = linked_copy(demo_built.path, tmp / "rel")
    with pytest.MonkeyPatch.context() as mp, HubServer(tmp / "hub", tokens=(TOKEN,)) as hub:
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        mp.setenv("HF_ENDPOINT", hub.url)
        mp.setenv("HF_TOKEN", TOKEN)
        mp.setenv("HF_HUB_CACHE", str(tmp / "cache"))
        mp.delenv("HF_HUB_OFFLINE", raising=False)
        unsigned = subprocess.run([*release_cmd(spec_path), "--push"], capture_output=True, text=True, cwd=tmp)
        assert unsigned.returncode == 2 and errors(unsigned.stderr) == [unsigned.stderr.strip().splitlines()[-1]]
        assert "--push without a signing key" in unsigned.stderr and "--unsigned" in unsigned.stderr
        done = subprocess.run([*release_cmd(spec_path), "--push", "--signing-key", str(key)], capture_output=True,
                              text=True, cwd=tmp, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        assert str(key) not in done.stdout + done.stderr and key.read_text() not in done.stdout + done.stderr
        yield load(spec_path), hub, key, pub, tmp


def inv(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=900)


def test_every_repo_is_signed_with_provenance_and_model_signing_checks_each_download(signed):
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    spec, hub, key, pub, tmp = signed
    api = HfApi(endpoint=hub.url)
    repos = {**{k: v.repo for k, v in spec.variants.items()}, **spec.adapter_repos()}
    assert set(spec.adapter_repos()) == {"cpt", "sft"}
    vm = read_manifest(pipeline.folder(spec, "verify")).figures["artifacts"]
    for name, repo in repos.items():
        files = set(api.list_repo_files(repo, revision=spec.hub.revision_tag))
        assert {signing.SIGNATURE, signing.PROVENANCE, signing.PUBLIC_KEY, "README.md", "LICENSE", "NOTICE"} <= files
        local = Path(snapshot_download(repo, revision=spec.hub.revision_tag, local_dir=tmp / "dl" / name,
                                        endpoint=hub.url))
        assert (local / ".cache" / "huggingface").is_dir()  # what --local-dir adds: ignored by the signature
        ok = ms_verify(local, local / signing.SIGNATURE, pub)
        assert ok.returncode == 0 and "Verification succeeded" in ok.stdout, (repo, ok.stderr)
        assert (local / signing.PUBLIC_KEY).read_bytes() == pub.read_bytes()
        card = (local / "README.md").read_text()
        assert "## Verify this release" in card and signing.fingerprint(pub.read_bytes()) in card
        st = provenance.read(local / signing.PROVENANCE)
        assert st["_type"] == provenance.STATEMENT and st["predicateType"] == provenance.PREDICATE
        subjects = {s["name"]: s["digest"]["sha256"] for s in st["subject"]}
        weights = {p: sha256_file(local / p) for p in files if p.endswith((".safetensors", ".gguf"))}
        assert subjects == weights and weights
        if name in spec.variants:
            built = pipeline.variant_dir(spec, name).relative_to(spec.build_dir)
            assert all(vm[(built / p).as_posix()]["sha256"] == d for p, d in subjects.items())  # what verify passed
        else:
            adapter = read_manifest(pipeline.folder(spec, name))
            assert subjects == {e.path: e.sha256 for e in adapter.outputs if e.path == "adapter_model.safetensors"}
            assert "base_model_relation: adapter" in card and f"base_model: {spec.base.model}" in card
        deps = {d["name"]: d for d in st["predicate"]["buildDefinition"]["resolvedDependencies"]}
        base = read_manifest(pipeline.folder(spec, "base"))
        assert {f"base/{e.path}": e.sha256 for e in base.outputs} == {
            n: d["digest"]["sha256"] for n, d in deps.items() if n.startswith("base/")}
        for stage in ("cpt", "sft"):
            if name == stage or (name == "cpt" and stage == "sft"):  # an adapter: built from those before it
                assert f"{stage}/adapter_model.safetensors" not in deps
                continue
            m = {e.path: e.sha256 for e in read_manifest(pipeline.folder(spec, stage)).outputs}
            d = deps[f"{stage}/adapter_model.safetensors"]
            assert d["digest"]["sha256"] == m["adapter_model.safetensors"]
            assert d["annotations"]["repo"] == spec.adapter_repos()[stage]
            assert f"/resolve/{spec.hub.revision_tag}/" in d["uri"]
        data = read_manifest(pipeline.folder(spec, "data"))
        assert {f"data/{e.path}": e.sha256 for e in data.outputs if e.path != "report.json"} == {
            n: d["digest"]["sha256"] for n, d in deps.items() if n.startswith("data/")}
        assert deps[f"spec/{spec.path.name}"]["digest"]["sha256"] == sha256_file(spec.path)
        im = spec.gguf_imatrix()
        if name in spec.variants:
            assert deps[f"spec/{im.calibration}"]["digest"]["sha256"] == sha256_file(spec.resolve(im.calibration))
        run = st["predicate"]["runDetails"]
        libraries = {"torch", "transformers", "peft", "bitsandbytes", "gguf", "llama-cpp-python"}
        assert libraries <= set(run["builder"]["version"])
        assert len(run["builder"]["version"]["git"]) >= 40
        record = pipeline.folder(spec, "verify") / "verification.json"
        assert run["byproducts"][0]["digest"]["sha256"] == sha256_file(record)
        assert st["predicate"]["buildDefinition"]["internalParameters"]["threads"]["llama.cpp"] >= 1
    # the Hugging Face cache's snapshot holds symlinks: model_signing checks it with --allow_symlinks
    gguf = spec.variants["gguf"].repo
    cached = Path(snapshot_download(gguf, revision=spec.hub.revision_tag, cache_dir=tmp / "cache", endpoint=hub.url))
    assert any(p.is_symlink() for p in cached.iterdir())
    assert ms_verify(cached, cached / signing.SIGNATURE, pub, "--allow_symlinks").returncode == 0
    # one GGUF file alone, with its own signature, as the card shows
    q = spec.gguf_file_name("Q4_K_M")
    one = tmp / "one"
    for f in (q, q + signing.FILE_SIGNATURE):
        hf_hub_download(gguf, f, revision=spec.hub.revision_tag, local_dir=one, endpoint=hub.url)
    assert ms_verify(one / q, one / (q + signing.FILE_SIGNATURE), pub).returncode == 0
    # the re-run signs to the same bytes, so a second push sends nothing
    again = inv("release", "--spec", str(spec.path), "--push", "--signing-key", str(key), cwd=tmp)
    assert again.returncode == 0, again.stderr[-2000:]
    plan = json.loads((spec.build_dir / "publish" / "plan.json").read_text())
    assert all(not r["add"] and not r["change"] and not r["delete"] for r in plan["repos"].values())


def test_inv_check_passes_the_release_and_refuses_each_other_byte_in_one_line(signed, monkeypatch):
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the local Hub speaks LFS, not xet

    spec, hub, key, pub, tmp = signed
    api = HfApi(endpoint=hub.url)
    bf16, gguf = spec.flagship.repo, spec.variants["gguf"].repo
    for repo in (bf16, gguf, spec.adapter_repos()["sft"]):
        ok = inv("check", repo, "--revision", spec.hub.revision_tag, "--key", str(pub), cwd=tmp)
        assert ok.returncode == 0, ok.stderr[-2000:]
        assert "files match their signature and provenance" in ok.stdout and "DIFFERS" not in ok.stdout
        assert spec.base.model in ok.stdout and signing.fingerprint(pub.read_bytes())[:19] in ok.stdout
    q = spec.gguf_file_name("Q4_K_M")
    one = inv("check", gguf, "--file", q, "--key", str(pub), cwd=tmp)
    assert one.returncode == 0 and q in one.stdout and spec.gguf_file_name("Q8_0") not in one.stdout, one.stderr
    without = inv("check", bf16, cwd=tmp)  # the repo's own key: passes, with a note to compare it
    assert without.returncode == 0 and "note: checked with the repo's own key" in without.stderr

    def commit(repo: str, ops: list) -> str:
        return api.create_commit(repo, ops, commit_message="not the release").oid

    cache = tmp / "cache"
    original = Path(api.hf_hub_download(gguf, q, revision=spec.hub.revision_tag, cache_dir=cache))
    tampered = tmp / "tampered.gguf"
    data = bytearray(original.read_bytes())
    data[-1000] ^= 0xFF
    tampered.write_bytes(bytes(data))
    other = tmp / "other" / "release.key"
    other_pub, _ = signing.keygen(other)
    prov = json.loads(Path(api.hf_hub_download(bf16, signing.PROVENANCE, revision=spec.hub.revision_tag,
                                               cache_dir=cache)).read_text())
    for d in prov["predicate"]["buildDefinition"]["resolvedDependencies"]:
        if d["name"] == "sft/adapter_model.safetensors":
            d["digest"]["sha256"] = "ab" * 32
    forged = tmp / "forged"
    forged.mkdir()
    (forged / signing.PROVENANCE).write_text(provenance.dumps(prov))
    remote = {f: Path(api.hf_hub_download(bf16, f, revision=spec.hub.revision_tag, cache_dir=cache))
              for f in api.list_repo_files(bf16, revision=spec.hub.revision_tag) if f != ".gitattributes"}
    digests = {f: sha256_file(p) for f, p in remote.items() if f != signing.SIGNATURE}
    digests[signing.PROVENANCE] = sha256_file(forged / signing.PROVENANCE)
    signing.sign(forged / signing.SIGNATURE, bf16.split("/")[-1], digests, signing.load_key(key))  # the right key
    resigned = tmp / "resigned"
    resigned.mkdir()
    signing.sign(resigned / signing.SIGNATURE, gguf.split("/")[-1],
                 {f: sha256_file(Path(api.hf_hub_download(gguf, f, revision=spec.hub.revision_tag, cache_dir=cache)))
                  for f in api.list_repo_files(gguf, revision=spec.hub.revision_tag)
                  if f not in (".gitattributes", signing.SIGNATURE, signing.PUBLIC_KEY)} | {
                     signing.PUBLIC_KEY: sha256_file(other_pub)}, signing.load_key(other))
    cases = {
        "a tampered weight file": (gguf, [CommitOperationAdd(q, str(tampered))],
                                   f"{q}: sha256 {sha256_file(tampered)[:12]}… differs from the signed"),
        "an added file": (gguf, [CommitOperationAdd("extra.gguf", str(tampered))],
                          "extra.gguf: not covered by model.sig (added after signing)"),
        "a removed file": (gguf, [CommitOperationDelete(spec.gguf_file_name("Q3_K_M"))],
                           f"{spec.gguf_file_name('Q3_K_M')}: signed in model.sig but missing"),
        "another key": (gguf, [CommitOperationAdd(signing.SIGNATURE, str(resigned / signing.SIGNATURE)),
                               CommitOperationAdd(signing.PUBLIC_KEY, str(other_pub))],
                        f"signed by key {signing.fingerprint(other_pub.read_bytes())}, not by "
                        f"{signing.fingerprint(pub.read_bytes())}"),
        "provenance naming other inputs": (bf16, [CommitOperationAdd(p, str(forged / p))
                                                  for p in (signing.PROVENANCE, signing.SIGNATURE)],
                                           "provenance.intoto.json: names sft/adapter_model.safetensors sha256 "
                                           "abababababab…, but"),
    }
    for what, (repo, ops, line) in cases.items():
        held = set(api.list_repo_files(repo, revision=spec.hub.revision_tag))
        undo = [CommitOperationAdd(op.path_in_repo, api.hf_hub_download(repo, op.path_in_repo, cache_dir=cache,
                                                                         revision=spec.hub.revision_tag))
                if op.path_in_repo in held else CommitOperationDelete(op.path_in_repo) for op in ops]
        rev = commit(repo, ops)
        bad = inv("check", repo, "--revision", rev, "--key", str(pub), cwd=tmp)
        assert bad.returncode == 1, (what, bad.stdout, bad.stderr)
        assert "Traceback" not in bad.stderr
        lines = errors(bad.stderr)
        assert len(lines) == 1 and line in lines[0], (what, lines)
        commit(repo, undo)  # each case on the release as published
    # the tagged release itself is untouched by all that
    assert inv("check", gguf, "--revision", spec.hub.revision_tag, "--key", str(pub), cwd=tmp).returncode == 0


def test_inv_reproduce_rebuilds_the_published_files_byte_for_byte(signed):
    """The GGUF repo rebuilt from its provenance: base, the adapters from their repos, merge, the
    importance matrix and every quant type; the BF16 and FP16 files its merge made are the
    published ones too."""
    from huggingface_hub import HfApi

    spec, hub, key, pub, tmp = signed
    build = tmp / "reproduce-gguf"
    done = inv("reproduce", spec.variants["gguf"].repo, "--revision", spec.hub.revision_tag, "--key", str(pub),
               "--spec", str(spec.path), "--build", str(build), cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "7 weight files rebuilt byte for byte" in done.stdout and " NO " not in done.stdout
    api = HfApi(endpoint=hub.url)
    for name in ("bf16", "fp16"):
        rebuilt = build / spec.release.name / pipeline.variant_dir(spec, name).relative_to(spec.build_dir)
        published = {f.path: f.lfs.sha256 for f in api.list_repo_tree(spec.variants[name].repo, recursive=True,
                                                                       revision=spec.hub.revision_tag)
                     if getattr(f, "lfs", None)}
        assert published and all(sha256_file(rebuilt / p) == d for p, d in published.items()), name
    # a spec that differs from the recorded one is refused, naming what to check out
    other = tmp / "other.toml"
    other.write_text(spec.path.read_text() + "\n# changed\n")
    done = inv("reproduce", spec.flagship.repo, "--key", str(pub), "--spec", str(other), "--build",
               str(tmp / "reproduce-other"), cwd=tmp)
    assert done.returncode == 2 and "check out the toolchain at the commit" in done.stderr, done.stderr


def test_a_push_refuses_unsigned_repos_unless_told(signed, tmp_path):
    from release import publish

    spec, hub, key, pub, tmp = signed
    plans = publish.read_plans(spec)
    for p in plans:
        p.files.pop(signing.SIGNATURE)
    with pytest.raises(publish.PublishError) as e:
        publish.push(spec, plans, progress=False)
    assert "not signed" in str(e.value) and "--unsigned" in str(e.value) and "\n" not in str(e.value)
