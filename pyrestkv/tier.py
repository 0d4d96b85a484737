"""The document tier file: every cell's K/V that a document read produced, kept on disk so that each
later question can score all of them and recall the ones it needs (pyrestkv.session).

Layout (little-endian):

    0   magic b"PYRKVTR\\0", u32 version, u32 0, u64 offset and u64 length of the JSON header
    64  the chunks, appended while the document is read: for each chunk of n cells and each layer,
        the n key rows then the n value rows (the cache's own types, a row per cell)
    ..  the arrays the header names: each cell's token and the position its keys were rotated at,
        the sliding-window layers' last window (iSWA models), the cells held when the read ended
    ..  the JSON header: the model's identity, the layers' K/V types and row sizes, the token
        count, the chunks' offsets, the arrays' offsets, the prompt around the document

The file is written under a temporary name beside its final one and renamed when complete, so a
read that fails (a full disk, an interrupt) never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

MAGIC = b"PYRKVTR\0"
VERSION = 1
PREAMBLE = struct.Struct("<8sIIQQ")  # magic, version, reserved, header offset, header length
DATA_START = 64


class TierError(ValueError):
    """A tier file that cannot be used: missing, truncated, corrupt, or written for another model."""


class TierWriter:
    """Appends chunks of cells to a temporary file; finish() completes it under its final name."""

    def __init__(self, path, layout: list):
        self.path = Path(path)
        self.layout = [tuple(int(x) for x in layer) for layer in layout]  # (k_type, k_row, v_type, v_row)
        self.cell_bytes = sum(k_row + v_row for _, k_row, _, v_row in self.layout)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".partial")
        self.tmp = Path(tmp)
        self.file = os.fdopen(fd, "wb")
        self.chunks: list = []  # [offset, n_cells]
        self.positions: list = []
        self.tokens: list = []
        self.n_cells = 0
        try:
            self.file.write(b"\0" * DATA_START)  # the preamble goes in last: until then it is no tier
        except BaseException:
            self.abort()
            raise

    def append(self, kv_bytes: np.ndarray, positions, tokens) -> None:
        """One chunk: its cells' K/V (seq_get_kv's layout), the positions its keys were rotated at, tokens."""
        n = len(positions)
        if len(kv_bytes) != n * self.cell_bytes or len(tokens) != n:
            raise ValueError("a chunk's K/V, positions and tokens must describe the same cells")
        self.chunks.append([self.file.tell(), n])
        self.file.write(memoryview(np.ascontiguousarray(kv_bytes, dtype=np.uint8)))
        self.positions.append(np.asarray(positions, dtype=np.int32))
        self.tokens.append(np.asarray(tokens, dtype=np.int32))
        self.n_cells += n

    def _array(self, array: np.ndarray) -> list:
        offset = self.file.tell()
        data = np.ascontiguousarray(array)
        self.file.write(memoryview(data).cast("B"))
        return [offset, int(data.nbytes)]

    def finish(self, header: dict, arrays: dict) -> Path:
        """Write the arrays (name -> int32 or uint8 array) and the header, then rename into place."""
        try:
            sections = {
                "positions": self._array(np.concatenate(self.positions) if self.positions else np.empty(0, np.int32)),
                "tokens": self._array(np.concatenate(self.tokens) if self.tokens else np.empty(0, np.int32)),
            }
            for name, array in arrays.items():
                sections[name] = self._array(array) + [str(np.asarray(array).dtype)]
            header = {**header, "version": VERSION, "layout": self.layout, "n_cells": self.n_cells,
                      "chunks": self.chunks, "sections": sections}
            text = json.dumps(header).encode()
            offset = self.file.tell()
            self.file.write(text)
            self.file.seek(0)
            self.file.write(PREAMBLE.pack(MAGIC, VERSION, 0, offset, len(text)))
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Drop the temporary file (a failed or interrupted read)."""
        try:
            self.file.close()
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)


class TierFile:
    """A complete tier, memory-mapped read-only."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"no document tier at {self.path} (doc.save(path) writes one)")
        if self.path.is_dir():
            raise TierError(f"{self.path} is a directory, not a document tier")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            preamble = f.read(PREAMBLE.size)
        if len(preamble) < PREAMBLE.size or preamble[:8] != MAGIC:
            raise TierError(f"{self.path} is not a pyrestkv document tier (no tier header)")
        _, version, _, offset, length = PREAMBLE.unpack(preamble)
        if version != VERSION:
            raise TierError(f"{self.path} is a version {version} tier; this pyrestkv reads version {VERSION}")
        if offset + length > size or offset < DATA_START:
            raise TierError(f"{self.path} is truncated: its header lies past the end of the file ({size} bytes)")
        self.map = np.memmap(self.path, dtype=np.uint8, mode="r")
        try:
            self.header = json.loads(bytes(self.map[offset : offset + length]))
            self.layout = [tuple(layer) for layer in self.header["layout"]]
            self.chunks = self.header["chunks"]
            self.n_cells = int(self.header["n_cells"])
            self.sections = self.header["sections"]
        except (ValueError, KeyError, TypeError) as e:
            raise TierError(f"{self.path} has a corrupt header ({e})") from None
        self.cell_bytes = sum(k_row + v_row for _, k_row, _, v_row in self.layout)
        end = DATA_START
        for chunk_offset, n in self.chunks:
            if chunk_offset != end:
                raise TierError(f"{self.path} is corrupt: its chunks do not follow one another")
            end += n * self.cell_bytes
        if sum(n for _, n in self.chunks) != self.n_cells or end > offset:
            raise TierError(f"{self.path} is corrupt: its chunks do not add up to {self.n_cells} cells")
        for name, section in self.sections.items():
            if section[0] + section[1] > offset:
                raise TierError(f"{self.path} is corrupt: its {name} array lies past the header")
        self.positions = self.array("positions", np.int32)
        self.tokens = self.array("tokens", np.int32)
        if len(self.positions) != self.n_cells or len(self.tokens) != self.n_cells:
            raise TierError(f"{self.path} is corrupt: {len(self.positions)} positions for {self.n_cells} cells")

    @property
    def nbytes(self) -> int:
        return int(self.path.stat().st_size)

    def array(self, name: str, dtype=None) -> np.ndarray:
        offset, nbytes = self.sections[name][:2]
        dtype = np.dtype(dtype or self.sections[name][2])
        return np.frombuffer(self.map, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)

    def layer_kv(self, il: int) -> tuple:
        """Layer il's keys and values of every cell, in document order: ([n, k_row], [n, v_row]) bytes."""
        _, k_row, _, v_row = self.layout[il]
        before = sum(k + v for _, k, _, v in self.layout[:il])
        keys, values = [], []
        for offset, n in self.chunks:
            start = offset + n * before
            keys.append(self.map[start : start + n * k_row])
            values.append(self.map[start + n * k_row : start + n * (k_row + v_row)])
        return (np.concatenate(keys).reshape(self.n_cells, k_row),
                np.concatenate(values).reshape(self.n_cells, v_row))

    def cells_kv(self, cells: np.ndarray) -> np.ndarray:
        """The K/V of these cells (indices in document order, ascending) in seq_put_kv's layout."""
        cells = np.asarray(cells, dtype=np.int64)
        starts = np.cumsum([0] + [n for _, n in self.chunks])
        out = []
        for il, (_, k_row, _, v_row) in enumerate(self.layout):
            before = sum(k + v for _, k, _, v in self.layout[:il])
            for part, row in ((0, k_row), (k_row, v_row)):
                for c, (offset, n) in enumerate(self.chunks):
                    mine = cells[(cells >= starts[c]) & (cells < starts[c + 1])] - starts[c]
                    if len(mine):
                        block = self.map[offset + n * (before + part) : offset + n * (before + part + row)]
                        out.append(block.reshape(n, row)[mine].reshape(-1))
        return np.concatenate(out) if out else np.empty(0, dtype=np.uint8)

    def close(self) -> None:
        self.map = None


def default_tier_dir() -> Path:
    """Where tiers go unless a path is given: $PYRESTKV_TIER_DIR, else the system's temporary directory."""
    return Path(os.environ.get("PYRESTKV_TIER_DIR") or tempfile.gettempdir())


def tier_path(tier: Optional[os.PathLike]) -> tuple:
    """(path, temporary): the given path, or a new unique one in default_tier_dir() that the
    document removes when it is closed."""
    if tier is not None:
        return Path(tier), False
    fd, name = tempfile.mkstemp(dir=default_tier_dir(), prefix="pyrestkv-", suffix=".kvdoc")
    os.close(fd)
    os.unlink(name)  # the writer creates it under a temporary name, then renames
    return Path(name), True
