"""The README is a guide that stays true: short enough to read, and every command in its code blocks
and every relative link works. Commands are checked in their cheap form (no GPU, Docker, network or
long run): `python <program> [subcommand] --help` must exit 0, `make` targets must exist (and
`make -n` must accept the line), `curl` must call the local server's Cog endpoints, `cog` must use a
Cog CLI verb, and the Python command of `cog run|exec python ...` must answer --help too. Each
checker is also fed a wrong example, so that a check that cannot fail is caught."""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 250
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
PYTHONS = {"python", "python3", ".venv/bin/python", "$(PY)"}
COG_VERBS = {"predict", "run", "train", "push", "exec", "build", "serve"}
LOCAL_HOSTS = {"localhost", "127.0.0.1"}
COG_PATHS = ("/predictions", "/trainings", "/health-check")
SEPARATORS = {"&&", "||", ";", "|", "&"}
FENCE = re.compile(r"^```([\w+-]*)\s*$")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


# -- reading the README ---------------------------------------------------------------------------
def code_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(language, lines) of every fenced code block."""
    blocks, lang, lines = [], None, []
    for line in text.splitlines():
        match = FENCE.match(line.strip())
        if lang is None and match:
            lang, lines = match.group(1).lower(), []
        elif lang is not None and line.strip() == "```":
            blocks.append((lang, lines))
            lang = None
        elif lang is not None:
            lines.append(line)
    assert lang is None, "an unclosed code block"
    return blocks


def command_lines(text: str) -> list[str]:
    """Shell command lines of the bash/sh/console/plain blocks, continuation lines joined; in a
    console block only `$ ` lines are commands (the rest is output)."""
    commands = []
    for lang, lines in code_blocks(text):
        if lang not in SHELL_LANGS:
            continue
        pending = ""
        for raw in lines:
            line = raw.strip()
            if lang == "console":
                if not (line.startswith("$ ") or pending):
                    continue
                line = line.removeprefix("$ ")
            if not pending and (not line or line.startswith("#")):
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            commands.append(pending + line)
            pending = ""
        assert not pending, f"a continued line ends its block: {pending!r}"
    return commands


def simple_commands(line: str) -> list[list[str]]:
    """A command line split into its simple commands' words (comments and leading VAR=value dropped)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, words = [], []
    for token in lexer:
        if token in SEPARATORS:
            commands.append(words)
            words = []
        else:
            words.append(token)
    commands.append(words)
    cleaned = []
    for words in commands:
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words = words[1:]
        if words:
            cleaned.append(words)
    return cleaned


def relative_links(text: str) -> list[str]:
    return [
        t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")
    ]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(markdown: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in markdown.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = None if in_code else re.match(r"^#{1,6}\s+(.*)$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            out.add(base if count == 0 else f"{base}-{count}")
            seen[base] = count + 1
    return out


# -- the checks -----------------------------------------------------------------------------------
def makefile_targets(makefile: Path = ROOT / "Makefile") -> set[str]:
    targets = set()
    for line in makefile.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.%/$()-][^:=\s]*(?:\s+[^:=\s]+)*)\s*:(?!=)", line)
        if match and not line.startswith("\t"):
            targets.update(match.group(1).split())
    return targets


def check_make(words: list[str], targets: set[str]) -> list[str]:
    """The targets of a `make` command line; each must exist in the Makefile."""
    named = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
    missing = [t for t in named if t not in targets]
    assert not missing, f"`{shlex.join(words)}`: no such Makefile target: {missing}"
    return named


def check_make_dry(words: list[str]) -> None:
    """`make -n`: make parses the line and its prerequisites exist; -n prints recipes, runs none
    (no recipe here calls $(MAKE) or is marked `+`, which -n would still run)."""
    env = {
        k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}
    }  # under `make test`
    result = subprocess.run(
        ["make", "-n", *words[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, f"`make -n {shlex.join(words[1:])}` failed:\n{result.stderr}"


def help_command(words: list[str]) -> tuple[str, ...]:
    """`python PROGRAM [SUBCOMMAND] ...` → the program and subcommand whose --help is checked."""
    assert words[0] in PYTHONS, words
    rest = words[1:]
    if rest[:1] == ["-m"]:
        program, rest = ("-m", rest[1]), rest[2:]
    else:
        program, rest = (rest[0],), rest[1:]
    sub = tuple(rest[:1]) if rest and not rest[0].startswith("-") else ()
    return program + sub


@functools.cache
def run_help(command: tuple[str, ...]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *command, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "TRAIN_JEMALLOC": "off"},  # no restart under jemalloc: faster
    )


def check_help(command: tuple[str, ...]) -> None:
    result = run_help(command)
    assert result.returncode == 0, (
        f"`python {shlex.join(command)} --help` exited {result.returncode}:\n{result.stderr[-2000:]}"
    )


def check_curl(words: list[str]) -> None:
    urls = [w for w in words[1:] if re.match(r"^(https?://)?(localhost|127\.0\.0\.1|[\w.-]+\.\w+)[:/]", w)]
    assert urls, f"`{shlex.join(words)}` names no URL"
    for url in urls:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        assert parts.hostname in LOCAL_HOSTS, f"{url}: curl in the README calls the local server"
        assert parts.path.startswith(COG_PATHS), f"{url}: not one of the Cog endpoints {COG_PATHS}"


def check_cog(words: list[str]) -> None:
    assert len(words) > 1 and words[1] in COG_VERBS, f"`{shlex.join(words)}`: not a Cog CLI verb {COG_VERBS}"


def cog_python(words: list[str]) -> list[str] | None:
    """The Python command a `cog run|exec python ...` line runs in the container (its --help is
    checked here like any other), else None."""
    if len(words) > 2 and words[1] in {"run", "exec"} and words[2] in PYTHONS:
        return words[2:]
    return None


def classify(commands: list[list[str]]) -> dict[str, list[list[str]]]:
    kinds: dict[str, list[list[str]]] = {"make": [], "python": [], "curl": [], "cog": []}
    for words in commands:
        kind = "python" if words[0] in PYTHONS else words[0]
        assert kind in kinds, f"`{shlex.join(words)}`: the README test has no check for {words[0]!r}; add one"
        kinds[kind].append(words)
    return kinds


# -- the README -----------------------------------------------------------------------------------
TEXT = README.read_text()
COMMANDS = [words for line in command_lines(TEXT) for words in simple_commands(line)]
KINDS = classify(COMMANDS)
IN_COG = [inner for words in KINDS["cog"] if (inner := cog_python(words))]
HELP_COMMANDS = sorted({help_command(words) for words in KINDS["python"] + IN_COG})
MAKE_LINES = sorted({tuple(words) for words in KINDS["make"]})


def test_readme_is_short():
    lines = len(TEXT.splitlines())
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines; move detail to docs/ (limit {MAX_README_LINES})"
    )


def test_readme_has_commands_of_every_kind():
    # The two top commands: the main job on the embedded default, and the test suite.
    assert COMMANDS[:2] == [["make", "predict", "PROMPT=Tell me something about alpacas."], ["make", "test"]]
    for kind, found in KINDS.items():
        assert found, f"no {kind} command in the README's code blocks"
    assert IN_COG, "no `cog run python ...` command (the guide's spelling) in the README's code blocks"


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=" ".join)
def test_python_commands_answer_help(command):
    check_help(command)


@pytest.mark.parametrize("words", MAKE_LINES, ids=" ".join)
def test_make_targets_exist(words):
    check_make(list(words), makefile_targets())
    check_make_dry(list(words))


@pytest.mark.parametrize("words", KINDS["curl"], ids=lambda w: next((x for x in w if "/" in x), "curl"))
def test_curl_calls_the_local_cog_server(words):
    check_curl(words)


@pytest.mark.parametrize("words", KINDS["cog"], ids=" ".join)
def test_cog_commands_use_cog_verbs(words):
    check_cog(words)


LINKED_DOCS = [README, ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize(
    "doc", [d for d in LINKED_DOCS if d.exists()], ids=lambda d: d.relative_to(ROOT).as_posix()
)
def test_relative_links_resolve(doc):
    broken = []
    for target in relative_links(doc.read_text()):
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve()
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
            broken.append(target)
    assert not broken, f"{doc.name}: broken links {broken}"


# -- each check can fail --------------------------------------------------------------------------
def test_the_checks_fail_on_wrong_commands(tmp_path):
    text = "\n".join(
        [
            "```bash",
            "make no-such-target  # a comment",
            "FOO=1 .venv/bin/python -m finetune no-such-command \\",
            "  --flag x && curl -s https://example.com/predictions",
            "```",
            "```console",
            "$ cog frobnicate",
            "output line, not a command",
            "```",
            "```python",
            "make ignored",
            "```",
        ]
    )
    commands = [words for line in command_lines(text) for words in simple_commands(line)]
    assert commands == [
        ["make", "no-such-target"],
        [".venv/bin/python", "-m", "finetune", "no-such-command", "--flag", "x"],
        ["curl", "-s", "https://example.com/predictions"],
        ["cog", "frobnicate"],
    ]
    with pytest.raises(AssertionError, match="no such Makefile target"):
        check_make(commands[0], makefile_targets())
    with pytest.raises(AssertionError, match="failed"):
        check_make_dry(commands[0])
    assert help_command(commands[1]) == ("-m", "finetune", "no-such-command")
    with pytest.raises(AssertionError, match="exited 2"):
        check_help(help_command(commands[1]))
    with pytest.raises(AssertionError, match="local server"):
        check_curl(commands[2])
    with pytest.raises(AssertionError, match="Cog endpoints"):
        check_curl(["curl", "http://localhost:5000/metrics"])
    with pytest.raises(AssertionError, match="Cog CLI verb"):
        check_cog(commands[3])
    inner = cog_python(["cog", "exec", "python", "-m", "finetune", "no-such-command"])
    assert help_command(inner) == ("-m", "finetune", "no-such-command")
    assert cog_python(["cog", "predict", "-i", "prompt=hi"]) is None
    with pytest.raises(AssertionError, match="no check"):
        classify([["rm", "-rf", "outputs"]])


def test_the_link_check_fails_on_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## A `code` heading: yes (2026)\n\n## Page\n")
    doc = tmp_path / "README.md"
    doc.write_text(
        "[ok](docs/page.md) [ok](docs/page.md#a-code-heading-yes-2026) [ok](docs/page.md#page-1)\n"
        "[web](https://example.com) [self](#top) ![img](nope.png)\n"
        "[gone](docs/missing.md) [bad anchor](docs/page.md#nowhere)\n"
    )
    links = relative_links(doc.read_text())
    assert links == [
        "docs/page.md",
        "docs/page.md#a-code-heading-yes-2026",
        "docs/page.md#page-1",
        "docs/missing.md",
        "docs/page.md#nowhere",
    ]
    with pytest.raises(AssertionError, match=r"docs/missing.md', 'docs/page.md#nowhere"):
        test_relative_links_resolve(doc)


def test_makefile_targets_are_parsed():
    targets = makefile_targets()
    assert {"predict", "test", "lint", "serve", "train", "demo", "weights"} <= targets
    assert "PYTHON" not in targets and "export PATH" not in targets
