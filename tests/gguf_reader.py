"""A minimal GGUF reader for tests: tensor infos and F32/F16/Q4_1/Q8_0 dequantization in NumPy,
so that reference computations use the model's weights independently of llama.cpp."""

import struct

import numpy as np

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGML_F32, GGML_F16, GGML_Q4_1, GGML_Q8_0 = 0, 1, 3, 8


class GGUF:
    def __init__(self, path):
        self.data = np.memmap(path, mode="r", dtype=np.uint8)
        self.off = 0
        assert bytes(self.data[:4]) == b"GGUF"
        self.off = 4
        version, n_tensors, n_kv = self._u32(), self._u64(), self._u64()
        assert version >= 2
        self.meta = {}
        for _ in range(n_kv):
            key = self._str()
            self.meta[key] = self._value(self._u32())
        self.tensors = {}
        for _ in range(n_tensors):
            name = self._str()
            n_dims = self._u32()
            dims = [self._u64() for _ in range(n_dims)]
            ttype = self._u32()
            offset = self._u64()
            self.tensors[name] = (dims, ttype, offset)
        align = self.meta.get("general.alignment", 32)
        self.base = (self.off + align - 1) // align * align

    def _unpack(self, fmt):
        size = struct.calcsize(fmt)
        val = struct.unpack_from("<" + fmt, self.data, self.off)[0]
        self.off += size
        return val

    def _u32(self):
        return self._unpack("I")

    def _u64(self):
        return self._unpack("Q")

    def _str(self):
        n = self._u64()
        s = bytes(self.data[self.off:self.off + n]).decode()
        self.off += n
        return s

    def _value(self, vtype):
        if vtype == 8:
            return self._str()
        if vtype == 9:
            etype, n = self._u32(), self._u64()
            return [self._value(etype) for _ in range(n)]
        return self._unpack(_SCALARS[vtype])

    def tensor(self, name) -> np.ndarray:
        """The tensor as float32, shaped [dims[-1], ..., dims[0]] (row-major, ggml's ne reversed)."""
        dims, ttype, offset = self.tensors[name]
        n = int(np.prod(dims))
        start = self.base + offset
        if ttype == GGML_F32:
            out = np.frombuffer(self.data, np.float32, n, start).copy()
        elif ttype == GGML_F16:
            out = np.frombuffer(self.data, np.float16, n, start).astype(np.float32)
        elif ttype == GGML_Q4_1:
            blocks = np.frombuffer(self.data, np.uint8, n // 32 * 20, start).reshape(-1, 20)
            d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
            m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
            qs = blocks[:, 4:]
            q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
            out = (q * d + m).ravel()
        elif ttype == GGML_Q8_0:
            blocks = np.frombuffer(self.data, np.uint8, n // 32 * 34, start).reshape(-1, 34)
            d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
            q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
            out = (q * d).ravel()
        else:
            raise NotImplementedError(f"tensor type {ttype} of {name}")
        return out.reshape(list(reversed(dims)))
