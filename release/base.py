"""Stage ``base``: the base model every later stage starts from.

Three sources, chosen by the spec:
- ``[base.scaffold]``: a random-init Llama-3 built here (the demo; no hub needed);
- ``base.path``: a local folder holding the base model (recorded, not copied);
- otherwise ``base.model`` is downloaded from the Hub into the Hugging Face cache (recorded,
  not copied).

The stage folder holds either the model itself (scaffold) or ``source.json`` naming the folder
and the sha256 of each weight file, so later stages can tell when the base changed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from release import scaffold
from release.artifacts import Manifest, Traits, run_stage, sha256_file, stage_dir, write_json
from release.errors import StageError
from release.spec import Spec

STAGE = "base"
TRAITS = Traits()
SOURCE = "source.json"
TOOLS = ("torch", "safetensors", "tokenizers", "transformers", "llama-models")


def model_dir(folder: Path) -> Path:
    """The folder holding the base model's files, once the stage has run in ``folder``: the
    scaffold itself, or the local or downloaded copy its ``source.json`` records."""
    source = folder / SOURCE
    if source.is_file():
        return Path(json.loads(source.read_text(encoding="utf-8"))["path"])
    return folder


def run(spec: Spec, inputs: Mapping[str, Path], *, force: bool = False, progress: bool = True) -> Manifest:
    """Stage ``base``; it reads no other stage (``inputs`` is empty): the base comes from the spec."""
    sections = {k: spec.section_hash(k) for k in ("base", "chat.bos_token", "chat.eos_token", "chat.pad_token")}

    def build(out: Path) -> dict:
        if spec.base.scaffold is not None:
            return scaffold.write_model(
                out, spec.base.scaffold, spec.chat, max_shard_bytes=spec.max_shard_bytes,
                tokenizer_cache=spec.resolve(spec.build.dir) / ".cache", progress=progress)
        if spec.base.path:
            return _record(spec.resolve(spec.base.path), out)
        source = _download(spec.base.model, spec.base.revision)
        return _record(source, out, revision=source.name)  # the snapshot folder is named by its commit

    return run_stage(STAGE, stage_dir(spec.build_dir, STAGE), build, release=spec.release.name,
                     spec_sections=sections, tools=TOOLS, force=force)


def _download(repo_id: str, revision: str | None = None) -> Path:
    import httpx
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=["*.json", "*.safetensors"]))
    except (httpx.HTTPError, OSError, HFValidationError) as e:  # network, auth, gated, offline, bad id
        raise StageError(f"base model {repo_id}: download failed ({type(e).__name__}); "
                         "log in with `hf auth login` or set base.path to a local copy") from e


def _record(folder: Path, out: Path, revision: str | None = None) -> dict:
    weights = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not weights:
        raise StageError(f"{folder}: not a model folder (needs config.json and *.safetensors); "
                         "fix base.path in the spec")
    files = {p.name: sha256_file(p) for p in weights}
    record = {"path": str(folder), "sha256": files}
    if revision:
        record["revision"] = revision
    write_json(out / SOURCE, record)
    return {"bytes": sum(p.stat().st_size for p in weights), "shards": len(weights)}
