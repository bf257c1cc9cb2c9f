"""What a model id, a revision and a file pattern may be, checked before any of them reaches a URL, a path in the
cache or a command line. Pure functions; each raises ValueError saying why.

- Model ids as the Hub validates them (huggingface_hub's `validate_repo_id`): `ORG/NAME`, each part 1-96 of
  `A-Z a-z 0-9 _ . -`, starting and ending with a letter, digit or `_`, no `--` or `..`, not ending in `.git`.
- Revisions: a branch, a tag, `refs/pr/N` or a 40-hex commit, under git's ref-name rules: segments of
  `A-Z a-z 0-9 _ . -` that start with a letter, digit or `_`, no `..`, no empty segment, no `.lock` or `.` at the end.
  (So no leading `-`, no backslash, no control character, no `/` at either end.)
- File patterns (fnmatch): never an option (no leading `-`), no `..` path segment, no backslash, no control character.
"""

from __future__ import annotations

import re

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_REPO_PART = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?$")
_REF_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_REVISION = 255
MAX_PATTERN = 512


def repo_id(value: str) -> str:
    parts = value.split("/")
    if len(parts) != 2:
        raise ValueError(f"{value!r} is not a model id of the form ORG/NAME")
    if not all(_REPO_PART.fullmatch(part) for part in parts):
        raise ValueError(f"{value!r} is not a model id: each of ORG and NAME is 1-96 letters, digits, '_', '.' or "
                         "'-', starting and ending with a letter, digit or '_'")
    if "--" in value or ".." in value:
        raise ValueError(f"{value!r} is not a model id: the Hub refuses '--' and '..' in ids")
    if value.endswith(".git"):
        raise ValueError(f"{value!r} is not a model id: the Hub refuses ids ending in '.git'")
    return value


def revision(value: str) -> str:
    if not value or len(value) > MAX_REVISION:
        raise ValueError(f"a revision is 1-{MAX_REVISION} characters, not {len(value)}")
    segments = value.split("/")
    if not all(_REF_SEGMENT.fullmatch(s) for s in segments) or ".." in value:
        raise ValueError(f"{value!r} is not a branch, tag, refs/pr/N or commit: segments of letters, digits, '_', "
                         "'.' and '-' that start with a letter, digit or '_', no '..', no empty segment")
    if any(s.endswith(".lock") for s in segments) or value.endswith("."):
        raise ValueError(f"{value!r} is not a git ref name: no segment ends in '.lock', the name does not end in '.'")
    return value


def pattern(value: str) -> str:
    if not value or len(value) > MAX_PATTERN:
        raise ValueError(f"a file pattern is 1-{MAX_PATTERN} characters, not {len(value)}")
    if value.startswith("-"):
        raise ValueError(f"{value!r} is not a file pattern: it starts with '-'")
    if "\\" in value or _CONTROL.search(value):
        raise ValueError(f"{value!r} is not a file pattern: no backslash or control character")
    if ".." in value.split("/"):
        raise ValueError(f"{value!r} is not a file pattern: it has a '..' path segment")
    return value
