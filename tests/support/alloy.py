"""A structural reader of Grafana Alloy's configuration syntax, for the deploy tests.

No ``alloy`` binary can be installed where the tests run (it is on neither PyPI, Debian nor
npm), so ``alloy fmt`` and ``alloy validate`` are out of reach. This module checks what can
be checked without them: that the file is well-formed Alloy syntax (blocks, attributes,
lists, objects and strings balanced and terminated; comments closed), and it returns the
blocks so that tests can check which components exist and what they reference. It does
not know every component's schema, evaluate expressions or type-check them: a file it
accepts may still be refused by Alloy itself.

Grammar (the subset of Alloy's syntax the reader accepts)::

    body      = { attribute | block }
    attribute = IDENT "=" expr
    block     = IDENT { "." IDENT } [ STRING ] "{" body "}"
    expr      = unary { BINARY_OP unary }
    unary     = [ "!" | "-" ] postfix
    postfix   = primary { "." IDENT | "[" expr "]" | "(" [ expr { "," expr } [","] ] ")" }
    primary   = STRING | RAW_STRING | NUMBER | "true" | "false" | "null" | IDENT
              | "[" [ expr { "," expr } [","] ] "]"
              | "{" [ key "=" expr { "," key "=" expr } [","] ] "}"
              | "(" expr ")"
    key       = IDENT | STRING
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


class AlloySyntaxError(ValueError):
    """The text is not well-formed; the message names the line."""


@dataclass(frozen=True)
class Token:
    kind: str  # ident, string, number, punct, op, eof
    text: str
    line: int


@dataclass(frozen=True)
class Reference:
    """A dotted name used as a value, e.g. ``loki.write.loki.receiver``."""

    path: str
    line: int


@dataclass
class Block:
    """One block: ``name`` (dotted), ``label`` (None when unlabelled), its attributes
    (name -> parsed value: str, float, bool, None, list, dict, Reference, or a tuple
    ``("expr", [operands])`` for an operator expression or a call) and nested blocks."""

    name: str
    label: str | None
    line: int
    attributes: dict[str, Any] = field(default_factory=dict)
    blocks: list[Block] = field(default_factory=list)

    def walk(self) -> list[Block]:
        """This block and every block nested in it, depth first."""
        found = [self]
        for child in self.blocks:
            found.extend(child.walk())
        return found


_TOKEN = re.compile(
    r"""
    (?P<ws>[ \t\r]+)
  | (?P<newline>\n)
  | (?P<line_comment>//[^\n]*)
  | (?P<block_comment>/\*.*?\*/)
  | (?P<open_comment>/\*)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<open_string>")
  | (?P<raw>`[^`]*`)
  | (?P<open_raw>`)
  | (?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>==|!=|<=|>=|&&|\|\||[<>+\-*/%^!])
  | (?P<punct>[{}\[\]().,=])
    """,
    re.VERBOSE | re.DOTALL,
)

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "a": "\a", "b": "\b"}
_ESCAPES.update({"f": "\f", "v": "\v"})
_BINARY = frozenset({"==", "!=", "<", "<=", ">", ">=", "&&", "||", "+", "-", "*", "/", "%", "^"})


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    line, pos = 1, 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise AlloySyntaxError(f"line {line}: unexpected character {text[pos]!r}")
        kind = match.lastgroup
        value = match.group()
        if kind in ("open_comment", "open_string", "open_raw"):
            what = {"open_comment": "comment", "open_string": "string", "open_raw": "string"}
            raise AlloySyntaxError(f"line {line}: unterminated {what[kind]}")
        if kind == "string":
            tokens.append(Token("string", _unquote(value, line), line))
        elif kind == "raw":
            tokens.append(Token("string", value[1:-1], line))
        elif kind in ("number", "ident", "op", "punct"):
            tokens.append(Token(kind, value, line))
        line += value.count("\n")
        pos = match.end()
    tokens.append(Token("eof", "", line))
    return tokens


def _unquote(quoted: str, line: int) -> str:
    out: list[str] = []
    chars = iter(quoted[1:-1])
    for char in chars:
        if char != "\\":
            out.append(char)
            continue
        escaped = next(chars)
        if escaped in _ESCAPES:
            out.append(_ESCAPES[escaped])
        elif escaped == "u":
            out.append(chr(int("".join(next(chars) for _ in range(4)), 16)))
        else:
            raise AlloySyntaxError(f"line {line}: unknown escape \\{escaped} in a string")
    return "".join(out)


class _Parser:
    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.pos = 0

    @property
    def token(self) -> Token:
        return self.tokens[self.pos]

    def next(self) -> Token:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def expect(self, kind: str, text: str | None = None) -> Token:
        token = self.next()
        if token.kind != kind or (text is not None and token.text != text):
            wanted = text or kind
            shown = token.text or "end of file"
            raise AlloySyntaxError(f"line {token.line}: expected {wanted!r}, found {shown!r}")
        return token

    def at(self, kind: str, text: str | None = None) -> bool:
        return self.token.kind == kind and (text is None or self.token.text == text)

    def body(self, closing: str | None) -> tuple[dict[str, Any], list[Block]]:
        attributes: dict[str, Any] = {}
        blocks: list[Block] = []
        while not (self.at("eof") if closing is None else self.at("punct", closing)):
            if self.at("eof"):
                raise AlloySyntaxError(f"line {self.token.line}: a block is not closed")
            first = self.expect("ident")
            if self.at("punct", "="):
                self.next()
                if first.text in attributes:
                    raise AlloySyntaxError(f"line {first.line}: attribute {first.text} twice")
                attributes[first.text] = self.expr()
                continue
            name = [first.text]
            while self.at("punct", "."):
                self.next()
                name.append(self.expect("ident").text)
            label = self.next().text if self.at("string") else None
            self.expect("punct", "{")
            inner_attributes, inner_blocks = self.body("}")
            self.expect("punct", "}")
            blocks.append(Block(".".join(name), label, first.line, inner_attributes, inner_blocks))
        return attributes, blocks

    def expr(self) -> Any:
        operands = [self.unary()]
        while self.at("op") and self.token.text in _BINARY:
            self.next()
            operands.append(self.unary())
        return operands[0] if len(operands) == 1 else ("expr", operands)

    def unary(self) -> Any:
        if self.at("op", "!") or self.at("op", "-"):
            self.next()
            return ("expr", [self.unary()])
        return self.postfix()

    def postfix(self) -> Any:
        value = self.primary()
        while True:
            if self.at("punct", ".") and isinstance(value, Reference):
                self.next()
                value = Reference(f"{value.path}.{self.expect('ident').text}", value.line)
            elif self.at("punct", "["):
                self.next()
                value = ("expr", [value, self.expr()])
                self.expect("punct", "]")
            elif self.at("punct", "("):
                self.next()
                value = ("expr", [value, *self.sequence(")")])
            else:
                return value

    def sequence(self, closing: str) -> list[Any]:
        """Comma-separated expressions up to ``closing`` (consumed); a trailing comma is
        allowed."""
        items: list[Any] = []
        while not self.at("punct", closing):
            items.append(self.expr())
            if not self.at("punct", closing):
                self.expect("punct", ",")
        self.expect("punct", closing)
        return items

    def primary(self) -> Any:
        token = self.next()
        if token.kind == "string":
            return token.text
        if token.kind == "number":
            return float(token.text)
        if token.kind == "ident":
            literals = {"true": True, "false": False, "null": None}
            if token.text in literals:
                return literals[token.text]
            return Reference(token.text, token.line)
        if token.kind == "punct" and token.text == "[":
            return self.sequence("]")
        if token.kind == "punct" and token.text == "{":
            return self.object()
        if token.kind == "punct" and token.text == "(":
            value = self.expr()
            self.expect("punct", ")")
            return value
        shown = token.text or "end of file"
        raise AlloySyntaxError(f"line {token.line}: expected a value, found {shown!r}")

    def object(self) -> dict[str, Any]:
        items: dict[str, Any] = {}
        while not self.at("punct", "}"):
            key = self.next()
            if key.kind not in ("ident", "string"):
                raise AlloySyntaxError(f"line {key.line}: expected an object key")
            self.expect("punct", "=")
            if key.text in items:
                raise AlloySyntaxError(f"line {key.line}: key {key.text} twice")
            items[key.text] = self.expr()
            if not self.at("punct", "}"):
                self.expect("punct", ",")
        self.expect("punct", "}")
        return items


def parse(text: str) -> list[Block]:
    """The top-level blocks of an Alloy file; raises AlloySyntaxError naming the line."""
    parser = _Parser(tokenize(text))
    attributes, blocks = parser.body(None)
    if attributes:
        raise AlloySyntaxError(f"top-level attributes are not allowed: {sorted(attributes)}")
    return blocks


def references(value: Any) -> list[Reference]:
    """Every :class:`Reference` inside a parsed value."""
    if isinstance(value, Reference):
        return [value]
    if isinstance(value, tuple):
        return [ref for operand in value[1] for ref in references(operand)]
    if isinstance(value, list):
        return [ref for item in value for ref in references(item)]
    if isinstance(value, dict):
        return [ref for item in value.values() for ref in references(item)]
    return []
