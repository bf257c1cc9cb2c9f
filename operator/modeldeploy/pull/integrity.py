"""Checks that a downloaded file is what the hub announced, streaming (bounded memory whatever the size).

The strongest check available is used and named: `sha256` (LFS files, from the listing or the X-Linked-Etag),
`git-sha1` (regular files), `sha256-via-lfs-pointer` (an LFS file listed with only its git blob id, as a hub without
LFS metadata may do: the pointer's id commits to the content's sha256), `checksum` (a sha256 the user supplied),
else `size+safetensors-header` or `size` for hubs that publish no hashes at all."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1024 * 1024
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Expected:
    path: str
    size: int | None
    sha256: str | None = None      # LFS content hash
    git_sha1: str | None = None    # git blob id: of the content for regular files, of the pointer for LFS files
    checksum: str | None = None    # user-supplied sha256


class IntegrityFailure(Exception):
    pass


def file_hash(path: Path, algorithm: str, prefix: bytes = b"") -> str:
    digest = hashlib.new(algorithm, prefix)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def safetensors_header_ok(path: Path) -> bool:
    """The header parses and its tensors end exactly at the end of the file (catches truncation)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return False
        (length,) = struct.unpack("<Q", raw)
        if length > min(size - 8, 100 * 1024 * 1024):
            return False
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return False
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    return 8 + length + (max(ends) if ends else 0) == size


def verify(path: Path, expected: Expected, blob_name: str, known_sha256: str | None = None) -> str:
    """Raises IntegrityFailure, or returns the name of the check that passed. `blob_name` is the ETag the hub
    served the file under: a sha256 for LFS files on Hugging Face. `known_sha256`: the file's own, when it was
    computed as the file arrived (so a large file is not read again)."""
    size = path.stat().st_size
    if expected.size is not None and size != expected.size:
        raise IntegrityFailure(f"{expected.path}: size {size}, the hub announced {expected.size}")
    # One pass over the file in the common cases: only the hash that can be compared is computed.
    if expected.checksum:
        sha256 = known_sha256 or file_hash(path, "sha256")
        if sha256 != expected.checksum.lower():
            raise IntegrityFailure(f"{expected.path}: sha256 {sha256} differs from the supplied checksum")
        return "checksum"
    announced_sha256 = expected.sha256 or (blob_name if SHA256_RE.match(blob_name) else None)
    if announced_sha256:
        sha256 = known_sha256 or file_hash(path, "sha256")
        if sha256 != announced_sha256:
            raise IntegrityFailure(f"{expected.path}: sha256 {sha256} differs from the hub's {announced_sha256}")
        return "sha256"
    if expected.git_sha1:
        git_sha1 = file_hash(path, "sha1", b"blob %d\0" % size)
        if git_sha1 == expected.git_sha1:
            return "git-sha1"
        # Hubs that leave LFS metadata out still list the git blob id, which for an LFS file is the id of its
        # pointer - and the pointer holds the content's sha256. So the content is still checked end to end.
        if lfs_pointer_sha1(known_sha256 or file_hash(path, "sha256"), size) == expected.git_sha1:
            return "sha256-via-lfs-pointer"
        raise IntegrityFailure(f"{expected.path}: neither the content ({git_sha1}) nor its LFS pointer matches the "
                               f"hub's git blob id {expected.git_sha1}")
    if expected.path.endswith(".safetensors"):
        if not safetensors_header_ok(path):
            raise IntegrityFailure(f"{expected.path}: safetensors header does not match the file")
        return "size+safetensors-header"
    return "size"


def lfs_pointer_sha1(sha256: str, size: int) -> str:
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    return hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()
