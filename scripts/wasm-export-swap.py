#!/usr/bin/env python3
"""Gives a wasm module's export NAME to the function exported as REPLACEMENT.

    scripts/wasm-export-swap.py IN OUT NAME=REPLACEMENT [NAME=REPLACEMENT ...]

The export NAME is removed, and the export REPLACEMENT is renamed NAME; every other byte of the
module is kept. A Rust symbol cannot take the name of the proxy-wasm SDK's `#[no_mangle]`
callback it replaces (the link would have two), so the plugin exports its own under another
name and the build swaps it in after linking (see src/wasm/callout.rs for why). The swap is refused,
and nothing is written, unless both exports exist, both are functions, and their signatures
match: the host calls the export with the ABI's arguments.

Exit codes: 0 written; 1 the module or the swap is not as expected; 2 bad arguments.
Python 3 standard library only.
"""

from __future__ import annotations

import sys

MAGIC = b"\0asm\x01\0\0\0"
TYPE, IMPORT, FUNCTION, EXPORT = 1, 2, 3, 7
FUNC_KIND = 0


class SwapError(Exception):
    """The module or the requested swap is not as expected; the message is for the user."""


def _uleb(data: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if at >= len(data):
            raise SwapError("truncated LEB128 number")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > 35:
            raise SwapError("LEB128 number too long")


def _encode_uleb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _name(data: bytes, at: int) -> tuple[bytes, int]:
    size, at = _uleb(data, at)
    if at + size > len(data):
        raise SwapError("truncated name")
    return data[at:at + size], at + size


def sections(module: bytes) -> list[tuple[int, bytes]]:
    if not module.startswith(MAGIC):
        raise SwapError("not a wasm module (version 1)")
    out, at = [], len(MAGIC)
    while at < len(module):
        section_id = module[at]
        size, body = _uleb(module, at + 1)
        if body + size > len(module):
            raise SwapError(f"section {section_id} runs past the end of the module")
        out.append((section_id, module[body:body + size]))
        at = body + size
    return out


def _types(body: bytes) -> list[bytes]:
    """Each function type's encoding, to compare signatures."""
    count, at = _uleb(body, 0)
    types = []
    for _ in range(count):
        start = at
        if body[at] != 0x60:
            raise SwapError("unknown type form")
        params, at = _uleb(body, at + 1)
        at += params
        results, at = _uleb(body, at)
        at += results
        types.append(body[start:at])
    return types


def _function_types(secs: list[tuple[int, bytes]]) -> list[int]:
    """The type index of every function, imports first (the function index space)."""
    out: list[int] = []
    for section_id, body in secs:
        if section_id == IMPORT:
            count, at = _uleb(body, 0)
            for _ in range(count):
                _, at = _name(body, at)
                _, at = _name(body, at)
                kind = body[at]
                at += 1
                if kind == FUNC_KIND:
                    index, at = _uleb(body, at)
                    out.append(index)
                elif kind == 1:  # table: reftype, limits
                    at += 1
                    flags, at = _uleb(body, at)
                    _, at = _uleb(body, at)
                    if flags & 1:
                        _, at = _uleb(body, at)
                elif kind == 2:  # memory: limits
                    flags, at = _uleb(body, at)
                    _, at = _uleb(body, at)
                    if flags & 1:
                        _, at = _uleb(body, at)
                elif kind == 3:  # global: valtype, mutability
                    at += 2
                else:
                    raise SwapError(f"unknown import kind {kind}")
        elif section_id == FUNCTION:
            count, at = _uleb(body, 0)
            for _ in range(count):
                index, at = _uleb(body, at)
                out.append(index)
    return out


def exports(module: bytes) -> list[tuple[str, int, int]]:
    """(name, kind, index) of every export."""
    for section_id, body in sections(module):
        if section_id == EXPORT:
            return _exports(body)
    return []


def _exports(body: bytes) -> list[tuple[str, int, int]]:
    count, at = _uleb(body, 0)
    out = []
    for _ in range(count):
        name, at = _name(body, at)
        kind = body[at]
        index, at = _uleb(body, at + 1)
        out.append((name.decode("utf-8", errors="replace"), kind, index))
    return out


def swap(module: bytes, pairs: list[tuple[str, str]]) -> bytes:
    secs = sections(module)
    types = next((_types(b) for i, b in secs if i == TYPE), [])
    func_types = _function_types(secs)
    export_at = next((n for n, (i, _) in enumerate(secs) if i == EXPORT), None)
    if export_at is None:
        raise SwapError("the module has no export section")
    table = _exports(secs[export_at][1])
    by_name = {name: (kind, index) for name, kind, index in table}

    def signature(name: str, index: int) -> bytes:
        try:
            return types[func_types[index]]
        except IndexError:
            raise SwapError(f"export {name!r} names function {index}, which the module lacks") from None

    for name, replacement in pairs:
        for wanted in (name, replacement):
            if wanted not in by_name:
                raise SwapError(f"the module exports no {wanted!r}")
            if by_name[wanted][0] != FUNC_KIND:
                raise SwapError(f"export {wanted!r} is not a function")
        if signature(name, by_name[name][1]) != signature(replacement, by_name[replacement][1]):
            raise SwapError(f"{replacement!r} does not have the signature of {name!r}")
    renamed = {replacement: name for name, replacement in pairs}
    removed = set(renamed.values())
    kept = [(renamed.get(n, n), k, i) for n, k, i in table if n not in removed]
    body = bytearray(_encode_uleb(len(kept)))
    for name, kind, index in kept:
        encoded = name.encode("utf-8")
        body += _encode_uleb(len(encoded)) + encoded + bytes([kind]) + _encode_uleb(index)
    secs[export_at] = (EXPORT, bytes(body))
    out = bytearray(MAGIC)
    for section_id, section in secs:
        out += bytes([section_id]) + _encode_uleb(len(section)) + section
    return bytes(out)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or any(arg.count("=") != 1 for arg in argv[2:]):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    src, dst, *specs = argv
    pairs = [tuple(spec.split("=")) for spec in specs]
    try:
        with open(src, "rb") as f:
            out = swap(f.read(), pairs)  # type: ignore[arg-type]
    except (SwapError, OSError) as e:
        print(f"wasm-export-swap: {src}: {e}", file=sys.stderr)
        return 1
    with open(dst, "wb") as f:
        f.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
