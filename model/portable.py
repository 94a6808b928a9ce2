"""Model state in a file format that cannot run code when read: a NumPy ``.npz`` archive, loaded with
``allow_pickle=False``.

Files such as the warm-start model (``flink.initial_model``) come from outside the job, and unpickling one would run
whatever it names. Here the structure (dicts, lists, tuples, strings, numbers) is JSON stored as one ``uint8``
array, and every NumPy array is a member of its own; object arrays, and so pickles, are refused on both sides.

>>> import numpy as np
>>> data = dumps({"w": np.arange(3, dtype=np.float32), "n": 7, "pair": (1, "a"), "counts": {5: 2}})
>>> back = loads(data)
>>> back["w"].tolist(), back["n"], back["pair"], back["counts"]
([0.0, 1.0, 2.0], 7, (1, 'a'), {5: 2})
>>> import pickle
>>> loads(pickle.dumps({"w": 1}))
Traceback (most recent call last):
...
ValueError: model file: a pickle, refused: reading one can run code; write model files with python -m model.warm_start (a NumPy .npz archive)
"""
from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import numpy as np

FORMAT = "streamrec-model"
FORMAT_VERSION = 1
_TREE = "__tree__"  # the member holding the JSON structure
_ZIP_MAGIC = b"PK\x03\x04"


def dumps(tree: Any) -> bytes:
    """``tree`` (dicts, lists, tuples, str, int, float, bool, None, NumPy arrays and scalars) as ``.npz`` bytes."""
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    encoded = {"format": FORMAT, "version": FORMAT_VERSION, "state": _encode(tree, arrays)}
    arrays[_TREE] = np.frombuffer(json.dumps(encoded).encode(), np.uint8)
    out = io.BytesIO()
    np.savez(out, **arrays)  # object arrays never get here (_encode refuses them)
    return out.getvalue()


def loads(data: bytes, what: str = "model file") -> Any:
    """The tree ``dumps`` wrote; raises ``ValueError`` naming ``what`` for anything else, a pickle above all."""
    if not data.startswith(_ZIP_MAGIC):
        if data[:1] == b"\x80" or data[:1] in (b"(", b"}", b"]"):  # pickle protocols 2+ and 0/1
            raise ValueError(f"{what}: a pickle, refused: reading one can run code; write model files with "
                             f"python -m model.warm_start (a NumPy .npz archive)")
        raise ValueError(f"{what}: not a model file (expected a NumPy .npz archive written by model.warm_start)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            encoded = json.loads(bytes(archive[_TREE]))
            if not isinstance(encoded, dict) or encoded.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} archive")
            if encoded.get("version") != FORMAT_VERSION:
                raise ValueError(f"format version {encoded.get('version')!r}, this reader knows {FORMAT_VERSION}")
            return _decode(encoded["state"], archive)
    except (ValueError, KeyError, TypeError, OSError, EOFError, RecursionError, zipfile.BadZipFile) as ex:
        # allow_pickle=False makes NumPy refuse object arrays with a ValueError: that ends here too.
        raise ValueError(f"{what}: not a readable model file: {type(ex).__name__}: {ex}") from None


def _encode(obj: Any, arrays: dict[str, np.ndarray[Any, Any]]) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.ndarray, np.generic)):
        value = np.asarray(obj)
        if value.dtype.hasobject:
            raise TypeError("model file: object arrays are not written (they would need pickle)")
        name = f"a{len(arrays)}"
        arrays[name] = value
        return {"$array" if isinstance(obj, np.ndarray) else "$scalar": name}
    if isinstance(obj, list):
        return [_encode(v, arrays) for v in obj]
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, arrays) for v in obj]}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, arrays) for k, v in obj.items()}
        return {"$dict": [[_encode(k, arrays), _encode(v, arrays)] for k, v in obj.items()]}
    raise TypeError(f"model file: cannot write a {type(obj).__name__}")


def _decode(obj: Any, archive: Any) -> Any:
    if isinstance(obj, list):
        return [_decode(v, archive) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (tag, value), = obj.items()
        if tag == "$array":
            return np.array(archive[value])  # a copy: the archive closes after loading
        if tag == "$scalar":
            return archive[value][()]
        if tag == "$tuple":
            return tuple(_decode(v, archive) for v in value)
        if tag == "$dict":
            return {_hashable(_decode(k, archive)): _decode(v, archive) for k, v in value}
    if any(k.startswith("$") for k in obj):
        raise ValueError(f"unknown tag in {sorted(obj)[:3]}")
    return {k: _decode(v, archive) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    if isinstance(key, (list, dict, np.ndarray)):
        raise ValueError(f"a {type(key).__name__} as a mapping key")
    return key
