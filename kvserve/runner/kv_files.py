"""KVBlockFiles: the disk tier's directory, one file per KV block, named by its chained hash.

    DIR/<hash hex>.kvblock   raw bytes of one block, every layer's K and V:
                             [num_layers, 2 (K, V), block_size, num_kv_heads, head_dim] in the KV dtype

Writes go to a temporary name and are renamed into place, so a file with the final name is
always complete. The files are not trusted across runs (a block hash names tokens, not the
model, dtype or block size that computed their KV): a new KVBlockFiles deletes the directory's
`*.kvblock` files and leftover temporaries. One engine per directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

SUFFIX = ".kvblock"
TMP_SUFFIX = ".kvblock.tmp"


class KVBlockFiles:
    def __init__(self, directory: str | Path, block_shape: tuple[int, ...], dtype: torch.dtype):
        """`block_shape`: one block's [num_layers, 2, block_size, num_kv_heads, head_dim]."""
        self.directory = Path(directory)
        self.block_shape = block_shape
        self.dtype = dtype
        self.num_bytes = dtype.itemsize * torch.Size(block_shape).numel()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.clear()

    def path(self, name: str) -> Path:
        return self.directory / f"{name}{SUFFIX}"

    def write(self, name: str, block: torch.Tensor) -> None:
        assert block.shape == self.block_shape and block.dtype == self.dtype, (block.shape, block.dtype)
        tmp = self.directory / f"{name}{TMP_SUFFIX}"
        tmp.write_bytes(block.contiguous().view(torch.uint8).numpy().tobytes())
        os.replace(tmp, self.path(name))

    def read(self, name: str) -> torch.Tensor:
        data = self.path(name).read_bytes()
        if len(data) != self.num_bytes:
            raise OSError(f"{self.path(name)}: {len(data)} bytes, a KV block has {self.num_bytes}")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(self.dtype).view(self.block_shape)

    def drop(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    def clear(self) -> None:
        for pattern in (f"*{SUFFIX}", f"*{TMP_SUFFIX}"):
            for path in self.directory.glob(pattern):
                path.unlink(missing_ok=True)
