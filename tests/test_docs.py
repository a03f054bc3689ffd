"""The docs (README.md and docs/*.md) stay true to the checkout: every relative link points to an
existing file, every #anchor into a markdown file to an existing heading, and every `./inv TASK`
command shown in code names an existing task and only options that task has."""

from __future__ import annotations

import re
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
SCHEME = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//)")
INV = re.compile(r"(?:^|(?<=[\s;&|(`\"']))\./inv(?=\s|$)")
SEPARATOR = re.compile(r"^(?:&&|\|\||;|\||&|[0-9]?>>?\S*|<)$")  # the shell command ends
TASK_WORD = re.compile(r"^[a-z][a-z0-9_-]*(?:\.[a-z][a-z0-9_-]*)*$")
ALWAYS = {"help", "h"}  # invoke's per-task help flag


# --- reading markdown -----------------------------------------------------------------------

def split(text: str) -> tuple[list[str], list[str]]:
    """(prose lines with fenced blocks blanked, fenced code blocks)."""
    prose, blocks, fence, block = [], [], None, []
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence is None and m:
            fence, block = m.group(1), []
            prose.append("")
        elif fence is not None:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line.strip()[len(m.group(1)):]:
                blocks.append("\n".join(block))
                fence = None
            else:
                block.append(line)
            prose.append("")
        else:
            prose.append(line)
    if fence is not None:
        blocks.append("\n".join(block))
    return prose, blocks


def paragraphs(prose: list[str]) -> list[str]:
    return [p for p in "\n".join(prose).split("\n\n") if p.strip()]


def code_spans(prose: list[str]) -> list[str]:
    return [m.group(2) for p in paragraphs(prose) for m in CODE_SPAN.finditer(p)]


def without_code(prose: list[str]) -> str:
    return "\n\n".join(CODE_SPAN.sub(lambda m: " " * len(m.group(0)), p) for p in paragraphs(prose))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation other than '-' and
    '_' dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    prose, _ = split(path.read_text(encoding="utf-8"))
    for line in prose:
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def links(text: str) -> list[str]:
    prose, _ = split(text)
    plain = without_code(prose)
    return [m.group(1) for m in LINK.finditer(plain)] + [m.group(1) for m in REFERENCE.finditer(plain)]


def link_problems(md: Path, text: str, root: Path = ROOT) -> list[str]:
    problems = []
    for target in links(text):
        if SCHEME.match(target):
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md.resolve()
        if not dest.is_relative_to(root):
            problems.append(f"{md.name}: link {target}: outside the checkout")
        elif not dest.exists():
            problems.append(f"{md.name}: link {target}: {dest.relative_to(root)} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{md.name}: link {target}: no heading #{anchor} in {dest.relative_to(root)}")
    return problems


# --- ./inv commands ---------------------------------------------------------------------------

def commands(text: str) -> list[list[str]]:
    """The words after each `./inv` in the code of ``text`` (spans and fenced blocks), up to the
    end of the shell command: comments dropped, continuation lines joined."""
    prose, blocks = split(text)
    chunks = [" ".join(span.split()) for span in code_spans(prose)]
    for block in blocks:
        chunks += block.replace("\\\n", " ").splitlines()
    out = []
    for chunk in chunks:
        chunk = re.sub(r"(?:^|\s)#.*$", "", chunk)
        for m in INV.finditer(chunk):
            words = []
            for word in chunk[m.end():].split():
                if SEPARATOR.match(word):
                    break
                words.append(word)
            out.append(words)
    return out


@cache
def task_flags() -> dict[str, tuple[set[str], set[str]]]:
    """Task name (as invoke lists it: `release`, `docker.build`) -> (long flags, short flags)."""
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    from tasks import ns

    out = {}
    for name in ns.task_names:
        long_, short = set(ALWAYS), set()
        for arg in ns[name].get_arguments():
            for flag in arg.names:
                (short if len(flag) == 1 else long_).add(flag)
                if arg.kind is bool and arg.default is True and len(flag) > 1:
                    long_.add(f"no-{flag}")  # invoke's inverse of a boolean option
        out[name] = (long_, short)
    return out


def find_task(word: str, tasks: dict) -> str | None:
    for candidate in (word, word.replace("-", "_"), word.replace("_", "-")):
        if candidate in tasks:
            return candidate
    return None


def command_problems(md: Path, text: str, tasks: dict) -> list[str]:
    problems = []
    for words in commands(text):
        if not words or words[0].startswith("-"):
            continue  # `./inv` alone, or invoke's own options (`./inv --list`)
        word = words[0].strip("[]()`'\",:;")
        if not TASK_WORD.match(word):
            continue  # a placeholder: `./inv <task> --help`, `./inv TASK`
        task = find_task(word, tasks)
        if task is None:
            problems.append(f"{md.name}: ./inv {word}: no such task")
            continue
        long_, short = tasks[task]
        for raw in words[1:]:
            token = raw.strip("[](){}`'\",;")
            if token.startswith("--") and len(token) > 2:
                flag = token[2:].split("=", 1)[0]
                if flag.replace("_", "-") not in long_:
                    problems.append(f"{md.name}: ./inv {task} {token}: {task} has no option --{flag}")
            elif re.fullmatch(r"-[A-Za-z]", token) and token[1] not in short and token[1] not in ALWAYS:
                problems.append(f"{md.name}: ./inv {task} {token}: {task} has no option {token}")
    return problems


# --- the tests --------------------------------------------------------------------------------

@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(md):
    problems = link_problems(md, md.read_text(encoding="utf-8"))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_inv_commands_name_existing_tasks_and_options(md):
    problems = command_problems(md, md.read_text(encoding="utf-8"), task_flags())
    assert not problems, "\n".join(problems)


def test_readme_states_the_test_command_and_links_every_guide():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = "\n".join(split(readme)[1])
    assert re.search(r"^\./inv test(\s|$)", blocks, re.MULTILINE), "README: no line runs ./inv test"
    assert "./inv test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(readme) if not SCHEME.match(t)}
    assert set(DOCS[1:]) <= linked, "guides the README does not link: " + ", ".join(
        str(p.relative_to(ROOT)) for p in set(DOCS[1:]) - linked)


def test_the_checks_catch_what_they_should(tmp_path):
    """The checker itself: a broken link, a missing anchor, an unknown task and an unknown option
    are each reported; what is fine is not."""
    docs = tmp_path / "docs"
    docs.mkdir()
    guide = "# A guide: `./inv x`\n\n## Stage `bnb4`: 4-bit, NF4\n\n## Stage `bnb4`: 4-bit, NF4\n"
    (docs / "guide.md").write_text(guide, encoding="utf-8")
    assert anchors(docs / "guide.md") == {"a-guide-inv-x", "stage-bnb4-4-bit-nf4", "stage-bnb4-4-bit-nf4-1"}
    md = tmp_path / "README.md"
    text = """# Top

[ok](docs/guide.md#stage-bnb4-4-bit-nf4) [ok too](#top) [web](https://example.com/x#y)
[gone](docs/missing.md) [bad anchor](docs/guide.md#nowhere) `[in code](docs/nothing.md)`

```bash
./inv release --spec specs/demo.toml --push   # --not-an-option, in a comment
./inv relase --spec x
HF_TOKEN=t ./inv hub.serve --port 8999 && ./inv docker.build --image release --bogus
./inv <task> --help
```

Run `./inv train --stage cpt --procesess 2` or `./inv test -k foo -z`.
"""
    md.write_text(text, encoding="utf-8")
    assert link_problems(md, text, tmp_path.resolve()) == [
        "README.md: link docs/missing.md: docs/missing.md does not exist",
        "README.md: link docs/guide.md#nowhere: no heading #nowhere in docs/guide.md",
    ]
    tasks = {"release": ({"help", "spec", "push"}, {"s"}), "hub.serve": ({"help", "port"}, set()),
             "docker.build": ({"help", "image"}, {"i"}), "train": ({"help", "stage", "processes"}, set()),
             "test": ({"help"}, {"k"})}
    assert sorted(command_problems(md, text, tasks)) == [
        "README.md: ./inv docker.build --bogus: docker.build has no option --bogus",
        "README.md: ./inv relase: no such task",
        "README.md: ./inv test -z: test has no option -z",
        "README.md: ./inv train --procesess: train has no option --procesess",
    ]
