"""The session document's edits, as ``session.patch`` carries them (docs/protocol.md): an RFC 7386
merge patch, then values set exactly at RFC 6901 JSON Pointers (so a field can be null).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from room_ledger import events as ev


def json_pointer(keys: Iterable[str]) -> str:
    """The RFC 6901 JSON Pointer of a path of object keys (``["a", "b/c"]`` -> ``"/a/b~1c"``)."""
    return "".join("/" + key.replace("~", "~0").replace("/", "~1") for key in keys)


def pointer_keys(pointer: str) -> list[str]:
    """The object keys of an RFC 6901 JSON Pointer (``""`` is the whole document: no keys)."""
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise ValueError(f"{pointer!r} is not a JSON Pointer: it must be empty or start with '/'")
    return [part.replace("~1", "/").replace("~0", "~") for part in pointer[1:].split("/")]


def set_at(document: dict[str, Any], pointer: str, value: Any) -> dict[str, Any]:
    """Store ``value`` exactly at ``pointer`` (objects missing on the way are created, as a merge
    patch creates them); returns the document. The whole document is replaced only by an object."""
    keys = pointer_keys(pointer)
    if not keys:
        return copy.deepcopy(value) if isinstance(value, dict) else document
    node = document
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[keys[-1]] = copy.deepcopy(value)
    return document


def apply_session_patch(document: dict[str, Any], body: ev.SessionPatch) -> dict[str, Any]:
    """``document`` changed by one ``session.patch``: its merge patch, then its exact values."""
    result = merge_patch(document, body.patch) if body.patch else document
    if not isinstance(result, dict):
        result = {}
    for pointer, value in body.set_values.items():
        result = set_at(result, pointer, value)
    return result


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch; returns the patched value (dicts are changed in place)."""
    if not isinstance(patch, dict):
        return patch
    if not isinstance(target, dict):
        target = {}
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict):
            target[key] = merge_patch(target.get(key), value)
        else:
            target[key] = value
    return target


