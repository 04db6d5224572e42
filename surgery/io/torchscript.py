"""Read the weights out of a TorchScript archive (OpenAI's original CLIP ``.pt`` files) without
running any of its code.

``torch.jit.load`` would compile the archive's TorchScript and run any ``__setstate__`` it
defines. Instead this module unpickles ``data.pkl`` with an allow-list: module objects become inert
:class:`_ScriptObjectState` records, tensors are rebuilt from the raw storage files, and any other
global the pickle names is refused. Nothing in the archive is ever executed.
"""
from __future__ import annotations

import io
import math
import pickle
import zipfile
from collections import OrderedDict
from typing import Any

import torch

from surgery.errors import CheckpointError

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


# TorchScript pickles typed containers through these helpers; all of them just return their input.
_LIST_BUILDERS = {
    "build_intlist": lambda x: x,
    "build_doublelist": lambda x: x,
    "build_boollist": lambda x: x,
    "build_tensorlist": lambda x: x,
    "build_genericlist": lambda x: x,
    "restore_type_tag": lambda value, type_str: value,
}


class _ScriptObjectState:
    """Inert stand-in for a scripted module: it only records the attributes the pickle sets."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state


class _StorageRef:
    def __init__(self, dtype: torch.dtype, key: str):
        self.dtype = dtype
        self.key = key


def is_torchscript_archive(path: str) -> bool:
    """True when ``path`` is a zip with any TorchScript member (``<name>/code/``,
    ``constants.pkl``): such a file is read here or refused with a reason that names what is
    wrong, never handed to ``torch.load`` (which refuses TorchScript zips under
    ``weights_only=True`` with a generic message)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return any("/code/" in n or n.endswith("/constants.pkl") for n in names)


def read_torchscript_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Flat ``{dotted.name: tensor}`` of every tensor attribute in a TorchScript archive."""
    try:
        with zipfile.ZipFile(path) as zf:
            data_pkl = next((n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1), None)
            if data_pkl is None:
                raise CheckpointError(f"{path}: TorchScript archive without a data.pkl (no weights to read); "
                                      "re-download or re-export it")
            prefix = data_pkl.rsplit("/", 1)[0]
            root = _SafeUnpickler(io.BytesIO(zf.read(data_pkl)), zf, prefix).load()
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, StopIteration, pickle.UnpicklingError, EOFError, KeyError, ValueError,
            RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable TorchScript archive ({exc}); re-download or re-export it") from None
    state: dict[str, torch.Tensor] = {}
    _flatten(root, "", state, seen=set())
    return state


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, zf: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._zf = zf
        self._prefix = prefix
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            return _ScriptObjectState
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad, hooks: data
        if module == "torch.jit._pickle" and name in _LIST_BUILDERS:
            return _LIST_BUILDERS[name]
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise CheckpointError(
            f"TorchScript archive refers to {module}.{name}, which a weights-only reader refuses; "
            "convert the checkpoint to safetensors in a trusted environment"
        )

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise CheckpointError(f"unexpected persistent id {pid!r} in TorchScript archive")
        storage_type, key = pid[1], str(pid[2])
        if storage_type not in _STORAGE_DTYPES:
            raise CheckpointError(f"unsupported storage type {storage_type!r} in TorchScript archive")
        return _StorageRef(_STORAGE_DTYPES[storage_type], key)

    def _storage(self, ref: _StorageRef) -> torch.Tensor:
        if ref.key not in self._storages:
            raw = bytearray(self._zf.read(f"{self._prefix}/data/{ref.key}"))
            self._storages[ref.key] = torch.frombuffer(raw, dtype=ref.dtype) if raw else torch.empty(0, dtype=ref.dtype)
        return self._storages[ref.key]

    def _rebuild_tensor(self, ref: _StorageRef, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
        flat = self._storage(ref)
        size, stride, offset = tuple(size), tuple(stride), int(offset)
        numel = math.prod(size)
        extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if numel else 0
        # the declared sizes are checked against the bytes the archive holds before anything is
        # allocated: a weight never has more elements than its storage (stride-0 expansions of a tiny
        # storage would make a 542-byte file cost gigabytes) nor reaches past its end
        if numel > flat.numel() or extent > flat.numel() or offset < 0 or any(s < 0 for s in stride):
            raise CheckpointError(f"tensor of size {size} (stride {stride}, offset {offset}) does not fit its "
                                  f"storage {ref.key} of {flat.numel()} elements; the archive is damaged or forged")
        return torch.as_strided(flat, size, stride, offset).clone()


def _flatten(obj: Any, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    attrs = obj.__dict__.get("_state", obj.__dict__) if isinstance(obj, _ScriptObjectState) else obj
    if not isinstance(attrs, dict):
        return
    for name, value in attrs.items():
        key = f"{prefix}{name}"
        if isinstance(value, torch.Tensor):
            out[key] = value
        elif isinstance(value, _ScriptObjectState):
            _flatten(value, key + ".", out, seen)
