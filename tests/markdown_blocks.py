"""The fenced code blocks of the project's Markdown files, for the tests that run what the docs show
(tests/test_docs.py, tests/test_distributed.py). Not a test module."""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                             if f.endswith(".md"))]

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)


@dataclass(frozen=True)
class Block:
    path: str    # relative to the repository root
    index: int   # the n-th block of this language in the file, from 0
    line: int    # line of the opening fence
    lang: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.path}:{self.lang}{self.index}"


def blocks(lang: str, paths=DOCS) -> list[Block]:
    out = []
    for path in paths:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            text = f.read()
        n = 0
        for m in _FENCE.finditer(text):
            if m.group(1) == lang:
                out.append(Block(path, n, text.count("\n", 0, m.start()) + 1, lang, m.group(2)))
                n += 1
    return out


def shell_commands(block: Block) -> list[list[str]]:
    """Each command of a bash block as argv: backslash continuations joined, comments dropped, and
    ``a && b`` split into its commands."""
    joined = re.sub(r"\\\n\s*", " ", block.text)
    commands = []
    for line in joined.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars="&|;")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        cmd = []
        for token in lexer:
            if token in ("&&", "||", ";", "|"):
                commands.append(cmd)
                cmd = []
            else:
                cmd.append(token)
        commands.append(cmd)
    return [c for c in commands if c]
