"""nginx's configuration syntax: words, `;`, blocks and `include`, with file and line.

The tokenizer follows ngx_conf_read_token (src/core/ngx_conf_file.c): words separated by
white space; `"..."` and `'...'` quote; a backslash escapes `"`, `'`, `\\` and writes `\\t`,
`\\r`, `\\n` as those characters; `#` starts a comment where a word could start; `${name}` keeps
its braces inside a word.  `include` is expanded here, with globs, relative to the directory of
the main file (nginx's conf prefix), so later stages see one tree in which every directive
carries the file and line it came from.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field

from ..errors import ConfigError


@dataclass(slots=True)
class Directive:
    name: str
    args: list[str]
    file: str
    line: int
    block: list[Directive] | None = None  # the directives inside `{ }`, for a block
    quoted: list[bool] = field(default_factory=list)  # for the name and each arg: in quotes

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


class SyntaxProblem(ConfigError):
    """A mistake located at file:line (nginx's "... in FILE:LINE")."""

    def __init__(self, file: str, line: int, problem: str) -> None:
        super().__init__(f"{file}:{line}", "", one_line(problem))


def one_line(text: str) -> str:
    """A message quoting the configuration stays one line: control characters escaped."""
    return "".join(ch if ch >= " " and ch != "\x7f" else repr(ch)[1:-1] for ch in text)


_SPACE = " \t\r\n"
_ESCAPES = {"t": "\t", "r": "\r", "n": "\n", '"': '"', "'": "'", "\\": "\\"}


def _tokens(text: str, file: str) -> list[tuple[str, int, bool]]:
    """(token, line, quoted) for each word, and for `;`, `{` and `}` (unquoted)."""
    out: list[tuple[str, int, bool]] = []
    i, n, line = 0, len(text), 1
    while i < n:
        ch = text[i]
        if ch == "\n":
            line += 1
            i += 1
        elif ch in _SPACE:
            i += 1
        elif ch == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif ch in ";{}":
            out.append((ch, line, False))
            i += 1
        elif ch in "\"'":
            start_line = line
            word: list[str] = []
            i += 1
            while True:
                if i >= n:
                    raise SyntaxProblem(file, start_line, "unexpected end of file in a quoted "
                                        "string")
                c = text[i]
                if c == ch:
                    i += 1
                    break
                if c == "\\" and i + 1 < n and text[i + 1] in _ESCAPES:
                    word.append(_ESCAPES[text[i + 1]])
                    i += 2
                    continue
                if c == "\n":
                    line += 1
                word.append(c)
                i += 1
            if i < n and text[i] not in _SPACE + ";{}#":
                raise SyntaxProblem(file, line, f"unexpected \"{text[i]}\" after a quoted "
                                    "string (nginx needs a space, \";\" or \"{\")")
            out.append(("".join(word), start_line, True))
        else:
            word = []
            while i < n:
                c = text[i]
                if c in _SPACE or c in ";{":
                    break
                if c == "}":
                    break
                if c == "$" and i + 1 < n and text[i + 1] == "{":
                    end = i + 2
                    while end < n and (text[end].isalnum() or text[end] == "_"):
                        end += 1
                    if end >= n or text[end] != "}" or end == i + 2:
                        raise SyntaxProblem(file, line, "a \"${\" without a variable name "
                                            "and its \"}\"")
                    word.append(text[i:end + 1])
                    i = end + 1
                    continue
                if c == "\\" and i + 1 < n:
                    nxt = text[i + 1]
                    if nxt in _ESCAPES:
                        word.append(_ESCAPES[nxt])
                        i += 2
                        continue
                word.append(c)
                i += 1
            out.append(("".join(word), line, False))
    return out


class _Reader:
    def __init__(self, prefix: str) -> None:
        self.conf_prefix = prefix
        self.files: list[str] = []
        self.active: list[str] = []

    def read_file(self, path: str, where: tuple[str, int] | None = None) -> list[Directive]:
        real = os.path.realpath(path)
        if real in self.active:
            assert where is not None
            raise SyntaxProblem(*where, f"include of {path} includes itself")
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                text = f.read()
        except OSError as exc:
            problem = f"cannot open {path}: {(exc.strerror or str(exc)).lower()}"
            if where is None:
                raise ConfigError(path, "", (exc.strerror or str(exc)).lower()) from None
            raise SyntaxProblem(*where, problem) from None
        self.files.append(path)
        self.active.append(real)
        try:
            tokens = _tokens(text, path)
            pos, body = self._block(tokens, 0, path, top=True)
            return body
        finally:
            self.active.pop()

    def _block(self, tokens: list[tuple[str, int, bool]], pos: int, file: str,
               top: bool = False) -> tuple[int, list[Directive]]:
        body: list[Directive] = []
        words: list[tuple[str, int, bool]] = []
        while pos < len(tokens):
            tok, line, quoted = tokens[pos]
            pos += 1
            if not quoted and tok == ";":
                if not words:
                    raise SyntaxProblem(file, line, "unexpected \";\"")
                d = self._directive(words, file)
                words = []
                if d.name == "include":
                    body.extend(self._include(d))
                else:
                    body.append(d)
            elif not quoted and tok == "{":
                if not words:
                    raise SyntaxProblem(file, line, "unexpected \"{\"")
                d = self._directive(words, file)
                words = []
                pos, d.block = self._block(tokens, pos, file)
                body.append(d)
            elif not quoted and tok == "}":
                if words:
                    raise SyntaxProblem(file, line, f"unexpected \"}}\": \"{words[0][0]}\" is "
                                        "not terminated by \";\"")
                if top:
                    raise SyntaxProblem(file, line, "unexpected \"}\"")
                return pos, body
            else:
                words.append((tok, line, quoted))
        if words:
            raise SyntaxProblem(file, words[0][1], f"unexpected end of file, expecting \";\" or "
                                f"\"}}\" after \"{words[0][0]}\"")
        if not top:
            last = tokens[-1][1] if tokens else 1
            raise SyntaxProblem(file, last, "unexpected end of file, expecting \"}\"")
        return pos, body

    @staticmethod
    def _directive(words: list[tuple[str, int, bool]], file: str) -> Directive:
        name, line, quoted = words[0]
        # a quoted first word is a value in a map's block ('' close;)
        return Directive(name, [w for w, _, _ in words[1:]], file, line,
                         quoted=[q for _, _, q in words])

    def _include(self, d: Directive) -> list[Directive]:
        if len(d.args) != 1:
            raise SyntaxProblem(d.file, d.line, "invalid number of arguments in \"include\"")
        pattern = os.path.join(self.conf_prefix, d.args[0])
        if glob.has_magic(pattern):
            # nginx includes the matches in sorted order, and a glob may match nothing
            return [x for path in sorted(glob.glob(pattern))
                    for x in self.read_file(path, (d.file, d.line))]
        return self.read_file(pattern, (d.file, d.line))


@dataclass(slots=True)
class Tree:
    body: list[Directive]
    files: list[str]          # every file read, the main one first (for `fastws -T`)


def read(path: str) -> Tree:
    """Read an nginx configuration and the files it includes into one tree of directives."""
    reader = _Reader(os.path.dirname(os.path.abspath(path)))
    body = reader.read_file(path)
    return Tree(body, reader.files)


def looks_like_nginx(text: str) -> bool:
    """True when a file's text is nginx's syntax rather than TOML: its first statement ends
    with `;` or opens a `{` block; TOML starts with `key = value` or a `[table]` line."""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.endswith((";", "{")):
            return True
        return not (line.startswith("[") or _TOML_KEY.match(line))
    return False


_TOML_KEY = re.compile(r"""[A-Za-z0-9_\-."']+\s*=""")
