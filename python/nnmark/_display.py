"""Names shown inert: file names, tensor names and messages reach the terminal as text.

A file name is the attacker's choice: ``[/x]`` would be rich markup, ``\\x1b]...``
an escape sequence that retitles the terminal or hides the lines before it, U+202E
reverses what follows. :func:`inert` makes any string safe to print as plain text;
:func:`markup_safe` also escapes rich markup, for strings that go into a rich table
or a markup-enabled ``print``.
"""
from __future__ import annotations

import os

# Bidirectional controls and other invisible format characters that reorder or hide text.
_INVISIBLE = frozenset(
    [0x061C, 0x200B, 0x200C, 0x200D, 0x200E, 0x200F, 0x2028, 0x2029, 0xFEFF]
    + list(range(0x202A, 0x202F)) + list(range(0x2060, 0x2070)))


def _escape_char(c: str) -> str:
    o = ord(c)
    if 0xDC80 <= o <= 0xDCFF:  # a byte of a name that is not UTF-8 (surrogateescape)
        return f"\\x{o - 0xDC00:02x}"
    if o < 0x100:
        return f"\\x{o:02x}"
    return f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}"


def inert(text) -> str:
    """``text`` (any object; paths as ``os.fspath``) as a printable string: control
    characters (C0, DEL, C1), invisible or reordering format characters and the bytes
    of a name that is not UTF-8 become visible escapes (``\\x1b``, ``\\u202e``, ``\\xff``);
    a backslash followed by such an escape stays as it is (names are shown, not parsed)."""
    if isinstance(text, os.PathLike):
        text = os.fspath(text)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    s = text if isinstance(text, str) else str(text)
    if s.isprintable():
        return s
    out = []
    for c in s:
        o = ord(c)
        if (o < 0x20 and c not in "\t\n") or 0x7F <= o < 0xA0 or o in _INVISIBLE or 0xD800 <= o <= 0xDFFF:
            out.append(_escape_char(c))
        elif not c.isprintable() and c not in "\t\n" and o >= 0xA0 and _is_format(c):
            out.append(_escape_char(c))
        else:
            out.append(c)
    return "".join(out)


def _is_format(c: str) -> bool:
    import unicodedata

    return unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")


def inert_line(text) -> str:
    """Like :func:`inert`, and newlines and tabs too: for a value shown on one line."""
    s = inert(text)
    return s.replace("\n", "\\n").replace("\t", "\\t") if ("\n" in s or "\t" in s) else s


def markup_safe(text) -> str:
    """:func:`inert_line`, then rich markup escaped: for table cells and markup-enabled prints."""
    from rich.markup import escape

    return escape(inert_line(text))


__all__ = ["inert", "inert_line", "markup_safe"]
