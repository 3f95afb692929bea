"""Read the authors' pickled G_LM tensors without executing code from the pickle.

The reference pickles a list of CUDA tensors with plain `pickle.dump`. Each tensor pickles
as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and each storage as
`torch.storage._load_from_bytes(b)`, where `b` is a whole `torch.save` file in torch's
legacy (pre-zip) format. `torch.load` on such a file calls arbitrary callables named in
it, and fails without CUDA. Here every callable the pickle names is looked up in a short
allow-list of harmless stand-ins; anything else raises `UnsafePickleError` before it runs.
The storage bytes (torch's legacy format) are parsed by hand and always land on the CPU;
a whole file in torch's zip format goes through `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct

import torch

from ..errors import PLDRError
from .consolidated import CheckpointError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# Storage class names torch pickles (torch.FloatStorage, torch.cuda.FloatStorage, ...).
STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class UnsafePickleError(PLDRError, pickle.UnpicklingError):
    """The pickle names a callable outside the tensor-rebuilding allow-list."""


def _refuse(where: str, module: str, name: str):
    raise UnsafePickleError(
        f"{where}: pickle asks for {module}.{name}, which is not a tensor-rebuilding callable; "
        f"refusing to load it (only tensors, lists, dicts and OrderedDicts are allowed)")


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, hooks=None, *rest):
    """Stand-in for torch._utils._rebuild_tensor_v2: a CPU view of an already-read storage."""
    if not isinstance(storage, torch.Tensor) or storage.dim() != 1:
        raise UnsafePickleError("tensor rebuild got something that is not a storage read by this loader")
    return torch.as_strided(storage, tuple(size), tuple(stride), int(storage_offset)).clone()


class _LegacyStorageUnpickler(pickle.Unpickler):
    """The main pickle of a legacy torch.save file: storage classes only, via persistent ids."""

    def __init__(self, f, where):
        super().__init__(f)
        self.where = where
        self.storages = {}  # key -> (dtype, numel)

    def find_class(self, module, name):
        if module in ("torch", "torch.cuda") and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        _refuse(self.where, module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafePickleError(f"{self.where}: unknown persistent id {pid!r:.80}")
        _, dtype, key, _location, numel = pid[:5]
        if not isinstance(dtype, torch.dtype):
            raise UnsafePickleError(f"{self.where}: storage type {dtype!r:.80} is not a known storage class")
        if len(pid) > 5 and pid[5] is not None:
            raise UnsafePickleError(f"{self.where}: storage views are not supported")
        self.storages.setdefault(key, (dtype, int(numel)))
        return _StorageRef(key)


class _StorageRef:
    def __init__(self, key):
        self.key = key


def _read_legacy_storage(blob: bytes, where: str) -> torch.Tensor:
    """Parse a legacy torch.save file whose object is one storage; return it as a 1-D CPU tensor."""
    f = io.BytesIO(blob)
    header = [_plain_load(f, where) for _ in range(3)]  # magic, protocol version, sys info
    if header[0] != LEGACY_MAGIC:
        raise UnsafePickleError(f"{where}: storage bytes are not a torch.save file (bad magic number)")
    unpickler = _LegacyStorageUnpickler(f, where)
    root = unpickler.load()
    keys = _plain_load(f, where)
    data = {}
    for key in keys:
        dtype, numel = unpickler.storages[key]
        (count,) = struct.unpack("<q", f.read(8))
        itemsize = torch.empty((), dtype=dtype).element_size()
        raw = f.read(count * itemsize)
        if count != numel or len(raw) != count * itemsize:
            raise UnsafePickleError(f"{where}: storage {key} is truncated ({len(raw)} bytes, expected {numel * itemsize})")
        data[key] = torch.frombuffer(bytearray(raw), dtype=dtype)
    if not isinstance(root, _StorageRef):
        raise UnsafePickleError(f"{where}: storage bytes hold {type(root).__name__}, not a storage")
    return data[root.key]


def _plain_load(f, where):
    """A header pickle: data only, no callables at all."""
    class NoCallables(pickle.Unpickler):
        def find_class(self, module, name):
            _refuse(where, module, name)
    return NoCallables(f).load()


def _storage_from_bytes(blob: bytes, where: str) -> torch.Tensor:
    if blob[:2] == b"PK":
        raise UnsafePickleError(f"{where}: a storage in torch's zip format inside a pickle is not supported "
                                f"(re-save the tensors with torch.save and load that file instead)")
    return _read_legacy_storage(blob, where)


class _OuterUnpickler(pickle.Unpickler):
    def __init__(self, f, where):
        super().__init__(f)
        self.where = where

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return lambda blob: _storage_from_bytes(blob, self.where)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        _refuse(self.where, module, name)

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.where}: unexpected persistent id {pid!r:.80} (not a pickled tensor list)")


def load_tensor_pickle(path) -> object:
    """Load a pickle of tensors (lists/dicts of them) onto the CPU, refusing any other callable.

    Raises UnsafePickleError for a pickle that names anything else, CheckpointError for a file
    that is missing or is no readable pickle at all (truncated, random bytes)."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open the pickle ({e.strerror or e}); check the path") from None
    with f:
        head = f.read(2)
        f.seek(0)
        try:
            if head == b"PK":
                return torch.load(f, map_location="cpu", weights_only=True)
            return _OuterUnpickler(f, str(path)).load()
        except UnsafePickleError:
            raise
        except pickle.UnpicklingError as e:
            if head == b"PK":   # torch's weights_only loader refused a callable
                raise UnsafePickleError(f"{path}: {_first_line(e)}; refusing to load it") from None
            raise CheckpointError(f"{path}: not a readable pickle ({_first_line(e)}); is this the G_LM "
                                  f"pickle file? copy it again from the source") from None
        except Exception as e:  # noqa: BLE001  (truncated or foreign bytes raise many types)
            raise CheckpointError(f"{path}: not a readable pickle ({type(e).__name__}: {_first_line(e)}); "
                                  f"is this the G_LM pickle file? copy it again from the source") from None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__


def load_g_lm_pickle(path, num_layers: int, num_heads: int, head_dim: int) -> list:
    """The authors' predefined G_LM pickle: L tensors [1, h, dk, dk] -> list of [h, dk, dk]."""
    obj = load_tensor_pickle(path)
    if not isinstance(obj, (list, tuple)) or len(obj) != num_layers:
        raise CheckpointError(f"{path}: expected a list of {num_layers} G_LM tensors, got "
                         f"{type(obj).__name__} of length {len(obj) if hasattr(obj, '__len__') else '?'}")
    out = []
    for i, g in enumerate(obj):
        if not isinstance(g, torch.Tensor) or g.numel() != num_heads * head_dim * head_dim:
            raise CheckpointError(f"{path}: layer {i} G_LM has shape {tuple(getattr(g, 'shape', ()))}, "
                             f"expected [1, {num_heads}, {head_dim}, {head_dim}] (does the model preset match?)")
        out.append(g.reshape(num_heads, head_dim, head_dim))
    return out
