"""The release spec: one TOML file holding every fact of a release.

Everything else in the toolchain reads facts from here and derives the rest (file names, stage
directories, tags) in one place. Loading validates the whole file at once and reports one line
per problem, naming the file, the key and what was expected, so a maintainer fixes a broken spec
in one pass. Of the package it imports only leaf modules that import nothing of it: the error
family, the schema conversion (release/schema.py) and the special-token table
(release/special_tokens.py, re-exported here as ``SPECIAL_TOKENS`` and ``VOCAB_BASE``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tomllib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from release import special_tokens
from release.errors import SpecError
from release.schema import convert, dotted
from release.special_tokens import SPECIAL_TOKENS, VOCAB_BASE

__all__ = [
    "Spec", "SpecError", "load", "owner_warnings", "GGUF_TYPES", "CONVERTED", "SPECIAL_TOKENS", "VOCAB_BASE",
    "printable", "unprintable", "unwritable",
]

# llama.cpp file types the GGUF stage can produce: CONVERTED ones by its own converter, the rest
# by llama.cpp's quantizer (from the F16 file).
CONVERTED = ("F16", "BF16", "Q8_0")
GGUF_TYPES = (
    *CONVERTED, "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S",
    "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "IQ4_XS", "Q5_0", "Q5_1", "Q4_0", "Q4_1",
)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FULL_MODULES = ("embed_tokens", "lm_head")

# Unicode categories no chat template (Jinja or Go) or Modelfile string may hold, with what to
# call them; line breaks and tabs are the control characters that are allowed.
_UNWRITABLE = {"Cc": "control character", "Cs": "surrogate", "Co": "private-use character",
               "Cn": "unassigned code point", "Cf": "format character", "Zs": "space character",
               "Zl": "line separator", "Zp": "paragraph separator"}


def printable(ch: str) -> bool:
    """Go's ``strconv.IsPrint``: letters, marks, numbers, punctuation, symbols, the ASCII space."""
    return ch == " " or unicodedata.category(ch)[0] in "LMNPS"


def unprintable(text: str) -> str | None:
    """Why ``text`` cannot be written into a chat template and a Modelfile (its first character
    that is not printable), or None. Ollama's Modelfile parser keeps only what Go's
    ``strconv.IsPrint`` accepts (letters, marks, numbers, punctuation, symbols, the ASCII space)
    plus line breaks and tabs, and drops the rest (a zero-width non-joiner, a no-break space);
    control characters cannot be template literals either. release/chat.py and
    release/modelfiles.py refuse such text with this rule for values built in code."""
    for ch in text:
        if ch in "\n\t" or printable(ch):
            continue
        kind = _UNWRITABLE.get(unicodedata.category(ch), "character")
        return f"contains the {kind} U+{ord(ch):04X}, which a template or Modelfile cannot hold; remove it"
    return None


def unwritable(text: str) -> str | None:
    """``unprintable``, and a ``\"\"\"`` that ends a line, which would end a Modelfile's
    triple-quoted block early. The spec refuses such text at load."""
    if re.search(r'"""(\n|$)', text):
        return "has '\"\"\"' at the end of a line, which would end a Modelfile block early; change the text"
    return unprintable(text)


# --- schema -----------------------------------------------------------------------------------
# Plain frozen data classes; fields without a default are required. The loader checks types
# from these annotations (release/schema.py), so the schema is written once.


@dataclass(frozen=True)
class Release:
    name: str
    basename: str
    version: str
    finetune: str
    size_label: str
    organization: str
    languages: list[str]
    license: str
    license_name: str
    license_link: str
    license_file: str
    tags: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Scaffold:
    """A random-init Llama-3 model built locally instead of downloading the base."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float = 500000.0
    rope_scaling: bool = True
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    init_std: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class Base:
    model: str
    architecture: Literal["LlamaForCausalLM"]
    parameters: str
    path: str | None = None
    scaffold: Scaffold | None = None
    revision: str | None = None  # the Hub commit (or tag) to download; recorded in the provenance


@dataclass(frozen=True)
class Lora:
    r: int
    alpha: int
    target_modules: list[str]
    dropout: float = 0.0
    use_rslora: bool = False
    trainable_parameters: int | None = None


@dataclass(frozen=True)
class Stage:
    description: str
    optimizer: Literal["adamw_8bit", "adamw_torch", "paged_adamw_8bit"]
    lr_scheduler: Literal["cosine", "linear", "constant"]
    warmup_ratio: float
    effective_batch_size: int
    per_device_batch_size: int
    learning_rate: float
    epochs: int
    format: str
    modules_to_save: list[str] = field(default_factory=list)
    packing: bool = False
    embedding_learning_rate: float | None = None
    train_on_responses_only: bool = False
    max_steps: int | None = None


@dataclass(frozen=True)
class Training:
    sequence_length: int
    precision: Literal["bf16", "fp16", "fp32"]
    gradient_checkpointing: bool
    hardware: str
    seed: int
    cpt: Stage
    sft: Stage
    save_steps: int = 500  # optimizer steps between checkpoints (a stage resumes from the last)


@dataclass(frozen=True)
class Corpus:
    name: str
    path: str
    format: Literal["jsonl", "parquet", "text"]
    language: Literal["ur", "en"] | None = None
    text_field: str = "text"
    # the dataset's Hub id ('owner/name'): listed in the cards' `datasets` metadata; without one
    # the cards name the dataset in their text only
    hub_id: str | None = None


@dataclass(frozen=True)
class Filters:
    """Curation thresholds (training/data.py)."""

    min_chars: int = 200  # documents shorter than this after cleaning are dropped
    min_script_ratio: float = 0.8  # share of letters in the corpus language's script
    max_repetition: float = 0.3  # share of words inside word 3-grams that occur twice or more
    near_duplicate_jaccard: float = 0.8  # MinHash-estimated Jaccard of character 5-gram shingles
    minhash_permutations: int = 128
    # lines matching one of these (Python regular expressions) are removed as boilerplate
    boilerplate: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Data:
    urdu_tokens: int
    english_tokens: int
    retained_fraction: float
    corpora: list[Corpus]
    instruct: Corpus
    urdu_sources: list[str] = field(default_factory=list)
    english_sources: list[str] = field(default_factory=list)
    filters: Filters = field(default_factory=Filters)
    # bad input (a record that is not JSON or not UTF-8, without its text field, a corrupt shard):
    # "refuse" stops the data stage at the first, naming file and line; "skip" skips and counts
    # each, and the report names them all (training/data.py)
    on_bad_data: Literal["refuse", "skip"] = "refuse"

    @property
    def replay_share(self) -> float:
        """English replay share of the continued pre-training tokens, from the token counts."""
        return self.english_tokens / (self.urdu_tokens + self.english_tokens)


@dataclass(frozen=True)
class Chat:
    template: Literal["llama3"]
    bos_token: str
    eos_token: str
    eot_token: str
    pad_token: str
    stop_tokens: list[str]
    system_prompt: str


@dataclass(frozen=True)
class Inference:
    max_new_tokens: int
    temperature: float
    top_p: float
    repetition_penalty: float
    do_sample: bool


@dataclass(frozen=True)
class Evaluation:
    min_urdu_purity: float
    enforce_urdu_purity: bool
    # every verification answer must end at a stop token (a trained chat model does; random weights do not)
    enforce_stop_token: bool
    max_new_tokens: int  # per verification answer (greedy)
    generation_prompts: int  # how many of verify's fixed Urdu prompts each variant answers
    # fidelity vs BF16: a fixed text (relative to the spec) cut into `fidelity_chunks` sequences of
    # `fidelity_chunk_tokens` tokens (BOS first), each run alone and scored at every position
    fidelity_text: str
    fidelity_chunks: int
    fidelity_chunk_tokens: int
    # how many of the answers must end at a stop token for the stop gate (None: every one)
    min_stopped: int | None = None
    # scores reported by the model's authors (the source is [provenance]); the cards' model-index
    overall_score: float | None = None
    urdu_purity: float | None = None
    benchmark: str | None = None  # what the reported scores were measured on, as the model-index names it


@dataclass(frozen=True)
class Imatrix:
    """llama.cpp's importance matrix for a GGUF variant's K- and IQ-quants: ``llama-imatrix``
    over a calibration text, cut into chunks of ``chunk_tokens`` tokens (BOS first)."""

    calibration: str  # a UTF-8 text file relative to the spec (not the evaluation text)
    chunk_tokens: int = 512  # llama-imatrix --ctx-size
    chunks: int | None = None  # at most this many chunks (default: every whole chunk of the text)
    description: str = ""  # what the text is, for the GGUF card


@dataclass(frozen=True)
class Variant:
    format: Literal["safetensors", "bnb-4bit", "gguf"]
    dtype: str
    repo: str
    compute_dtype: str | None = None
    double_quant: bool = False
    quant_types: list[str] = field(default_factory=list)
    imatrix: Imatrix | None = None  # GGUF only: [variants.<name>.imatrix]


@dataclass(frozen=True)
class Gate:
    max_kld: float
    min_top1: float


@dataclass(frozen=True)
class Ollama:
    model: str
    default_tag: str
    tags: dict[str, str]
    num_ctx: int  # context window of the Modelfiles, the hf.co params and the llama.cpp commands


@dataclass(frozen=True)
class LicenseTerms:
    """What the base model's licence (``release.license``) asks of a release built from it."""

    notice: str  # the attribution line of the NOTICE file in every repo
    attribution: str = ""  # shown in every card (Llama's "Built with Llama")
    use_policy: str | None = None  # the acceptable use policy the cards link to
    name_prefix: str = ""  # a derived model's name should begin with it (a warning at spec check)


@dataclass(frozen=True)
class Provenance:
    """Where the spec's facts come from: the model's own card, except the keys of ``not_on_card``
    (dotted key -> where its value comes from), which the cards mark as not stated by the authors."""

    source_name: str
    source_url: str
    not_on_card: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Hub:
    endpoint: str
    private: bool
    revision_tag: str
    # the CPT and SFT LoRA adapters in repos of their own (``adapter_repos``), so that every input
    # the provenance names can be downloaded and the release rebuilt (`./inv reproduce`)
    publish_adapters: bool = False


@dataclass(frozen=True)
class Build:
    dir: str
    max_shard_size: str = "5GB"


@dataclass(frozen=True)
class Spec:
    release: Release
    base: Base
    lora: Lora
    training: Training
    data: Data
    chat: Chat
    inference: Inference
    evaluation: Evaluation
    variants: dict[str, Variant]
    gates: dict[str, Gate]
    ollama: Ollama
    license_terms: LicenseTerms
    provenance: Provenance
    hub: Hub
    build: Build
    # Set by load(), not read from the file.
    path: Path = field(default=Path("."), compare=False)
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    # --- derived facts: computed here, nowhere else ---------------------------------------
    def resolve(self, relative: str) -> Path:
        """A path written in the spec, relative to the spec file's folder."""
        return (self.path.parent / relative).resolve()

    @property
    def license_text(self) -> str:
        return self.resolve(self.release.license_file).read_text(encoding="utf-8")

    @property
    def build_dir(self) -> Path:
        """``<build.dir>/<release name>``: every stage writes below it."""
        return self.resolve(self.build.dir) / self.release.name

    @property
    def flagship_key(self) -> str:
        return next(k for k, v in self.variants.items() if _is_flagship(v))

    @property
    def flagship(self) -> Variant:
        """The BF16 safetensors variant: the model the others are made from."""
        return next(v for v in self.variants.values() if _is_flagship(v))

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.build.max_shard_size)

    def gguf_types(self) -> list[str]:
        """Every GGUF file type of the release: the converted one first, then the quants."""
        out: list[str] = []
        for v in self.variants.values():
            if v.format == "gguf":
                out += [v.dtype, *v.quant_types]
        return out

    def gguf_imatrix(self) -> Imatrix | None:
        """The importance matrix settings of the GGUF variant, if it has them."""
        return next((v.imatrix for v in self.variants.values() if v.format == "gguf" and v.imatrix), None)

    def imatrix_file_name(self) -> str:
        """The importance matrix beside the GGUF files: ``<Name>-imatrix.gguf`` (llama-imatrix's format)."""
        return f"{self.release.name}-imatrix.gguf"

    def gguf_file_name(self, qtype: str) -> str:
        """GGUF naming convention: ``<Name>-<Type>.gguf``, e.g. ``Qalb-1.0-8B-Instruct-Q4_K_M.gguf``."""
        return f"{self.release.name}-{qtype}.gguf"

    def modelfile_name(self, qtype: str) -> str:
        """Modelfiles are named after their Ollama tag, e.g. ``8b-instruct-q4_K_M.Modelfile``."""
        return f"{self.ollama.tags[qtype]}.Modelfile"

    def adapter_repos(self) -> dict[str, str]:
        """Training stage -> the repo its LoRA adapter is published in (``hub.publish_adapters``):
        ``<owner>/<release name>-CPT-LoRA`` and ``-SFT-LoRA``, beside the flagship."""
        if not self.hub.publish_adapters:
            return {}
        owner = self.flagship.repo.split("/")[0]
        return {stage: f"{owner}/{self.release.name}-{stage.upper()}-LoRA" for stage in ("cpt", "sft")}

    def not_on_card(self, key: str) -> str | None:
        """Where the value of dotted ``key`` comes from when the model's card does not state it
        (``[provenance.not_on_card]``, which may name the key or a table above it), else None."""
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            why = self.provenance.not_on_card.get(".".join(parts[:n]))
            if why is not None:
                return why
        return None

    @property
    def datasets(self) -> list[str]:
        """Hub ids of the training datasets that have one (corpora, then the instruct set)."""
        return [c.hub_id for c in [*self.data.corpora, self.data.instruct] if c.hub_id]

    def section_hash(self, *keys: str) -> str:
        """sha256 of the named spec sections (dotted keys), so a stage re-runs only when the
        facts it reads change."""
        picked = {key: dotted(self.raw, key) for key in keys}
        blob = json.dumps(picked, sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


def _is_flagship(v: Variant) -> bool:
    return v.format == "safetensors" and v.dtype == "bfloat16"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)\s*$", re.I)


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as huggingface_hub's max_shard_size)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size like '5GB': {text!r}")
    unit = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[m.group(2).upper()]
    return int(float(m.group(1)) * unit)


# --- loading ----------------------------------------------------------------------------------


def load(path: str | Path) -> Spec:
    """Read and validate a spec file; raise SpecError listing every problem found."""
    path = Path(path)
    shown = str(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError([f"{shown}: no such spec file"]) from None
    except UnicodeDecodeError as e:
        raise SpecError([f"{shown}: not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError([f"{shown}: not valid TOML: {e}"]) from None
    problems: list[str] = []
    spec = convert(Spec, raw, "", problems, skip={"path", "raw"})
    if problems:
        raise SpecError([f"{shown}: {p}" for p in problems])
    spec = dataclasses.replace(spec, path=path.resolve(), raw=raw)
    problems = _check(spec)
    if problems:
        raise SpecError([f"{shown}: {p}" for p in problems])
    return spec


# --- checking ---------------------------------------------------------------------------------
# Rules that cross fields or need more than a type, one checker per section. Each returns
# ``key: message`` lines and reads values the type check already vouched for; where a rule needs
# another section to be valid first (gates and Ollama tags cover the variants), ``_check`` passes
# that fact in explicitly.


def _check(s: Spec) -> list[str]:
    """Every section's problems, section by section."""
    variants = _check_variants(s.variants)
    # gates and tags are matched to the variants only when those are valid, so one wrong
    # quant type is one problem, not one per section that refers to it
    gguf_types = None if variants else s.gguf_types()
    return [
        *_check_release(s), *_check_base(s.base), *_check_lora(s.lora),
        *_check_training(s.training), *_check_data(s.data), *_check_chat(s.chat),
        *_check_inference(s.inference), *_check_evaluation(s), *variants, *_check_imatrix(s),
        *_check_gates(s, gguf_types), *_check_ollama(s, gguf_types), *_check_license_terms(s.license_terms),
        *_check_provenance(s), *_check_hub(s.hub), *_check_build(s.build),
    ]


def owner_warnings(s: Spec) -> list[str]:
    """What a valid spec may still want its owner to look at: ``key: message`` lines."""
    terms, name = s.license_terms, s.release.name
    if terms.name_prefix and not name.startswith(terms.name_prefix):
        return [f"release.name: {name!r} does not begin with {terms.name_prefix!r}, which the base model's "
                f"licence ({s.release.license}, {s.release.license_name}) asks of a model trained from its "
                f"materials (license_terms.name_prefix); the owner decides"]
    return []


def _need(p: list[str], ok: bool, key: str, msg: str) -> None:
    if not ok:
        p.append(f"{key}: {msg}")


def _check_release(s: Spec) -> list[str]:
    r = s.release
    p: list[str] = []
    _need(p, bool(r.name) and "/" not in r.name, "release.name",
          "expected a repository-style name without '/', e.g. 'Qalb-1.0-8B-Instruct'")
    for i, lang in enumerate(r.languages):
        _need(p, re.fullmatch(r"[a-z]{2,3}", lang) is not None, f"release.languages[{i}]",
              f"expected an ISO 639 code like 'ur', got {lang!r}")
    _need(p, s.resolve(r.license_file).is_file(), "release.license_file",
          f"expected a text file relative to the spec, {r.license_file!r} does not exist")
    return p


def _check_base(b: Base) -> list[str]:
    p: list[str] = []
    _need(p, b.path is None or b.scaffold is None, "base.path",
          "give either base.path (a local model) or [base.scaffold] (a model built here), not both")
    return p + (_check_scaffold(b.scaffold) if b.scaffold else [])


def _check_scaffold(sc: Scaffold) -> list[str]:
    # llama.cpp's k-quant block size. Imported here, not at the top: the gguf package pulls in
    # numpy (~0.1 s), which only specs with a scaffold (the demo and tests) pay.
    from gguf.constants import QK_K

    p: list[str] = []
    for name in ("hidden_size", "intermediate_size"):
        size = getattr(sc, name)
        _need(p, size > 0 and size % QK_K == 0, f"base.scaffold.{name}",
              f"expected a positive multiple of {QK_K} (GGUF k-quant rows), got {size}")
    _need(p, sc.num_hidden_layers >= 1, "base.scaffold.num_hidden_layers", "expected at least 1")
    heads_ok = sc.num_attention_heads > 0 and sc.hidden_size % sc.num_attention_heads == 0
    _need(p, heads_ok, "base.scaffold.num_attention_heads",
          f"expected a divisor of hidden_size {sc.hidden_size}, got {sc.num_attention_heads}")
    _need(p, sc.num_key_value_heads > 0 and sc.num_attention_heads % sc.num_key_value_heads == 0,
          "base.scaffold.num_key_value_heads",
          f"expected a divisor of num_attention_heads {sc.num_attention_heads} (GQA), "
          f"got {sc.num_key_value_heads}")
    _need(p, sc.init_std > 0, "base.scaffold.init_std", "expected a positive number")
    return p


def _check_lora(lora: Lora) -> list[str]:
    p: list[str] = []
    _need(p, lora.r > 0, "lora.r", f"expected a positive integer, got {lora.r}")
    _need(p, lora.alpha > 0, "lora.alpha", f"expected a positive integer, got {lora.alpha}")
    _need(p, 0.0 <= lora.dropout < 1.0, "lora.dropout", f"expected 0 <= dropout < 1, got {lora.dropout}")
    for i, m in enumerate(lora.target_modules):
        _need(p, m in LORA_TARGETS, f"lora.target_modules[{i}]",
              f"expected one of {', '.join(LORA_TARGETS)}, got {m!r}")
    _need(p, bool(lora.target_modules), "lora.target_modules", "expected at least one module")
    return p


def _check_training(t: Training) -> list[str]:
    p: list[str] = []
    _need(p, t.sequence_length > 0, "training.sequence_length", "expected a positive integer")
    _need(p, t.save_steps > 0, "training.save_steps", f"expected a positive integer, got {t.save_steps}")
    return p + _check_stage(t.cpt, "training.cpt") + _check_stage(t.sft, "training.sft")


def _check_stage(st: Stage, key: str) -> list[str]:
    p: list[str] = []
    _need(p, st.learning_rate > 0, f"{key}.learning_rate", f"expected a positive number, got {st.learning_rate}")
    _need(p, 0.0 <= st.warmup_ratio < 1.0, f"{key}.warmup_ratio", f"expected 0 <= ratio < 1, got {st.warmup_ratio}")
    _need(p, st.per_device_batch_size > 0 and st.effective_batch_size % st.per_device_batch_size == 0,
          f"{key}.effective_batch_size",
          f"expected a multiple of per_device_batch_size {st.per_device_batch_size}, "
          f"got {st.effective_batch_size}")
    _need(p, st.epochs > 0, f"{key}.epochs", f"expected a positive integer, got {st.epochs}")
    for i, m in enumerate(st.modules_to_save):
        _need(p, m in FULL_MODULES, f"{key}.modules_to_save[{i}]",
              f"expected one of {', '.join(FULL_MODULES)}, got {m!r}")
    return p


def _check_data(d: Data) -> list[str]:
    p: list[str] = []
    _need(p, 0.0 < d.retained_fraction <= 1.0, "data.retained_fraction",
          f"expected a fraction in (0, 1], got {d.retained_fraction}")
    names = [c.name for c in d.corpora]
    _need(p, len(names) == len(set(names)), "data.corpora", "corpus names must be unique")
    keyed = [(f"data.corpora[{i}].hub_id", c.hub_id) for i, c in enumerate(d.corpora)]
    for key, hub_id in [*keyed, ("data.instruct.hub_id", d.instruct.hub_id)]:
        _need(p, hub_id is None or _REPO_ID.fullmatch(hub_id) is not None, key,
              f"expected a Hub dataset id 'owner/name', got {hub_id!r}")
    p += _check_filters(d.filters)
    _need(p, d.urdu_tokens > 0 and d.english_tokens >= 0, "data.english_tokens",
          "expected urdu_tokens > 0 and english_tokens >= 0 (they set the English replay share)")
    return p


def _check_filters(fl: Filters) -> list[str]:
    p: list[str] = []
    _need(p, fl.min_chars >= 0, "data.filters.min_chars", f"expected a non-negative integer, got {fl.min_chars}")
    for key in ("min_script_ratio", "max_repetition", "near_duplicate_jaccard"):
        value = getattr(fl, key)
        _need(p, 0.0 <= value <= 1.0, f"data.filters.{key}", f"expected a fraction in [0, 1], got {value}")
    _need(p, fl.minhash_permutations >= 16, "data.filters.minhash_permutations", "expected at least 16")
    for i, pattern in enumerate(fl.boilerplate):
        try:
            re.compile(pattern)
        except re.error as e:
            p.append(f"data.filters.boilerplate[{i}]: not a valid regular expression ({e})")
    return p


def _check_chat(c: Chat) -> list[str]:
    """Tokens must be Llama 3 special tokens (the tokenizer, templates and Modelfiles use them by
    name and id); the system prompt goes verbatim into templates and Modelfiles."""
    p: list[str] = []
    tokens = [(f"chat.{name}", getattr(c, name)) for name in ("bos_token", "eos_token", "eot_token", "pad_token")]
    tokens += [(f"chat.stop_tokens[{i}]", t) for i, t in enumerate(c.stop_tokens)]
    for key, token in tokens:
        if token not in SPECIAL_TOKENS:
            p.append(f"{key}: expected {special_tokens.described()}, got {token!r}")
    _need(p, c.eot_token in c.stop_tokens, "chat.stop_tokens",
          f"expected the end-of-turn token {c.eot_token!r} among the stop tokens")
    _need(p, c.eos_token in c.stop_tokens, "chat.stop_tokens",
          f"expected the eos token {c.eos_token!r} among the stop tokens")
    prompt = c.system_prompt
    why = unwritable(prompt)
    if why:
        p.append(f"chat.system_prompt: {why}")
    _need(p, unicodedata.is_normalized("NFC", prompt), "chat.system_prompt",
          "expected NFC-normalised text (normalise it with unicodedata.normalize('NFC', ...))")
    _need(p, prompt.strip() == prompt and prompt != "", "chat.system_prompt",
          "expected non-empty text without leading or trailing whitespace")
    return p


def _check_inference(inf: Inference) -> list[str]:
    p: list[str] = []
    _need(p, inf.max_new_tokens > 0, "inference.max_new_tokens", "expected a positive integer")
    _need(p, 0.0 <= inf.temperature <= 2.0, "inference.temperature", f"expected 0..2, got {inf.temperature}")
    _need(p, 0.0 < inf.top_p <= 1.0, "inference.top_p", f"expected a number in (0, 1], got {inf.top_p}")
    _need(p, inf.repetition_penalty > 0, "inference.repetition_penalty", "expected a positive number")
    return p


def _check_evaluation(s: Spec) -> list[str]:
    ev = s.evaluation
    p: list[str] = []
    _need(p, 0.0 <= ev.min_urdu_purity <= 1.0, "evaluation.min_urdu_purity",
          f"expected a fraction in [0, 1], got {ev.min_urdu_purity}")
    _need(p, ev.max_new_tokens > 0, "evaluation.max_new_tokens",
          f"expected a positive integer, got {ev.max_new_tokens}")
    for key in ("generation_prompts", "fidelity_chunks"):
        _need(p, getattr(ev, key) > 0, f"evaluation.{key}", f"expected a positive integer, got {getattr(ev, key)}")
    _need(p, ev.min_stopped is None or 0 < ev.min_stopped <= ev.generation_prompts, "evaluation.min_stopped",
          f"expected a count of answers from 1 to generation_prompts ({ev.generation_prompts}), got {ev.min_stopped}")
    _need(p, ev.fidelity_chunk_tokens >= 2, "evaluation.fidelity_chunk_tokens",
          f"expected at least 2 (BOS and one token of text), got {ev.fidelity_chunk_tokens}")
    _need(p, s.resolve(ev.fidelity_text).is_file(), "evaluation.fidelity_text",
          f"expected a text file relative to the spec, {ev.fidelity_text!r} does not exist")
    return p


def _check_variants(variants: dict[str, Variant]) -> list[str]:
    p: list[str] = []
    flagships = [n for n, v in variants.items() if _is_flagship(v)]
    _need(p, len(flagships) == 1, "variants",
          f"expected exactly one safetensors variant with dtype 'bfloat16' (the flagship), found {len(flagships)}")
    repos = [v.repo for v in variants.values()]
    _need(p, len(repos) == len(set(repos)), "variants", "each variant needs its own repo")
    for name, v in variants.items():
        p += _check_variant(v, f"variants.{name}")
    return p


_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _check_variant(v: Variant, key: str) -> list[str]:
    p: list[str] = []
    _need(p, _REPO_ID.fullmatch(v.repo) is not None, f"{key}.repo",
          f"expected 'owner/name', got {v.repo!r}")
    if v.format == "safetensors":
        _need(p, v.dtype in ("bfloat16", "float16"), f"{key}.dtype",
              f"expected 'bfloat16' or 'float16' for safetensors, got {v.dtype!r}")
    elif v.format == "bnb-4bit":
        _need(p, v.dtype in ("nf4", "fp4"), f"{key}.dtype", f"expected 'nf4' or 'fp4', got {v.dtype!r}")
        _need(p, v.compute_dtype in ("bfloat16", "float16", "float32"), f"{key}.compute_dtype",
              f"expected 'bfloat16', 'float16' or 'float32', got {v.compute_dtype!r}")
    elif v.format == "gguf":
        _need(p, v.dtype in CONVERTED, f"{key}.dtype",
              f"expected the converted type {_alternatives(CONVERTED)}, got {v.dtype!r}")
        for i, q in enumerate(v.quant_types):
            _need(p, q in GGUF_TYPES, f"{key}.quant_types[{i}]",
                  f"expected a llama.cpp type ({', '.join(GGUF_TYPES)}), got {q!r}")
    _need(p, v.imatrix is None or v.format == "gguf", f"{key}.imatrix",
          f"an importance matrix is for GGUF variants only, not {v.format!r}")
    return p


def _check_imatrix(s: Spec) -> list[str]:
    """The calibration text exists; chunk settings llama-imatrix accepts."""
    p: list[str] = []
    for name, v in s.variants.items():
        if v.imatrix is None:
            continue
        im, key = v.imatrix, f"variants.{name}.imatrix"
        _need(p, s.resolve(im.calibration).is_file(), f"{key}.calibration",
              f"expected a text file relative to the spec, {im.calibration!r} does not exist")
        _need(p, im.chunk_tokens >= 8, f"{key}.chunk_tokens", f"expected at least 8 tokens, got {im.chunk_tokens}")
        _need(p, im.chunks is None or im.chunks > 0, f"{key}.chunks", f"expected a positive integer, got {im.chunks}")
    return p


def _alternatives(values: tuple[str, ...]) -> str:
    """('F16', 'BF16', 'Q8_0') -> "'F16', 'BF16' or 'Q8_0'"."""
    quoted = [repr(v) for v in values]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1] if len(quoted) > 1 else quoted[0]


def _check_gates(s: Spec, gguf_types: list[str] | None) -> list[str]:
    """Gate values; with valid variants (``gguf_types`` not None), a gate for every GGUF type
    and every variant but the flagship."""
    p: list[str] = []
    for name, g in s.gates.items():
        _need(p, g.max_kld >= 0, f"gates.{name}.max_kld", f"expected a non-negative number, got {g.max_kld}")
        _need(p, 0.0 <= g.min_top1 <= 1.0, f"gates.{name}.min_top1", f"expected a fraction in [0, 1], got {g.min_top1}")
    if gguf_types is None:
        return p
    for q in gguf_types:
        _need(p, q in s.gates, "gates", f"missing a [gates.{q}] fidelity gate for GGUF type {q!r}")
    for key, v in s.variants.items():
        _need(p, v.format == "gguf" or _is_flagship(v) or key in s.gates, "gates",
              f"missing a [gates.{key}] fidelity gate for variant {key!r}")
    return p


def _check_ollama(s: Spec, gguf_types: list[str] | None) -> list[str]:
    """Tag names, model name and context; with valid variants (``gguf_types`` not None), exactly
    one tag per GGUF type."""
    o = s.ollama
    p: list[str] = []
    most = s.base.scaffold.max_position_embeddings if s.base.scaffold else None
    _need(p, o.num_ctx > 0 and (most is None or o.num_ctx <= most), "ollama.num_ctx",
          f"expected a positive integer{f' up to the model context {most}' if most else ''}, got {o.num_ctx}")
    for q in gguf_types or []:
        _need(p, q in o.tags, "ollama.tags", f"missing a tag for GGUF type {q!r}")
    for q, tag in o.tags.items():
        _need(p, gguf_types is None or q in gguf_types, f"ollama.tags.{q}", "names a GGUF type that no variant builds")
        _need(p, re.fullmatch(r"[\w][\w.-]{0,127}", tag) is not None, f"ollama.tags.{q}",
              f"expected an Ollama tag (letters, digits, '_', '.', '-'), got {tag!r}")
    _need(p, o.default_tag in o.tags.values(), "ollama.default_tag",
          f"expected one of the tags in [ollama.tags], got {o.default_tag!r}")
    _need(p, re.fullmatch(r"[a-z0-9][a-z0-9._-]*", o.model) is not None, "ollama.model",
          f"expected a lower-case Ollama model name, got {o.model!r}")
    return p


def _check_license_terms(t: LicenseTerms) -> list[str]:
    p: list[str] = []
    _need(p, t.notice.strip() != "" and "\n" not in t.notice.strip(), "license_terms.notice",
          "expected the licence's one-line attribution notice")
    _need(p, t.use_policy is None or re.fullmatch(r"https?://\S+", t.use_policy) is not None,
          "license_terms.use_policy", f"expected an http(s) URL, got {t.use_policy!r}")
    return p


def _check_provenance(s: Spec) -> list[str]:
    """The source is a URL; every key said not to be on the card names a value of this spec; the
    reported scores need a benchmark for the model-index."""
    p: list[str] = []
    _need(p, re.fullmatch(r"https?://\S+", s.provenance.source_url) is not None, "provenance.source_url",
          f"expected an http(s) URL, got {s.provenance.source_url!r}")
    for key in s.provenance.not_on_card:
        _need(p, dotted(s.raw, key) is not None, f"provenance.not_on_card.{key}", "names no value of this spec")
    ev = s.evaluation
    _need(p, ev.benchmark is not None or (ev.overall_score is None and ev.urdu_purity is None),
          "evaluation.benchmark", "expected a name for what the reported scores were measured on")
    return p


def _check_hub(hub: Hub) -> list[str]:
    p: list[str] = []
    _need(p, hub.endpoint == "local" or re.fullmatch(r"https?://\S+", hub.endpoint) is not None,
          "hub.endpoint", f"expected an http(s) URL or 'local', got {hub.endpoint!r}")
    return p


def _check_build(b: Build) -> list[str]:
    try:
        size = parse_size(b.max_shard_size)
    except ValueError:
        return [f"build.max_shard_size: expected a size like '5GB', got {b.max_shard_size!r}"]
    return [] if size > 0 else ["build.max_shard_size: expected a positive size"]
