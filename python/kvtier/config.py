"""kvtier's configuration: a dict, or a JSON or YAML file, checked key by key.

Every error names the bad key (with its path, e.g. ``local_disk.capacity_bytes``) and what was
expected, before anything is built.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from . import _kvtier

DTYPE_SIZES = {
    "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2,
    "float32": 4, "fp32": 4, "float": 4,
    "float8_e4m3fn": 1, "fp8_e4m3": 1, "fp8": 1, "float8_e5m2": 1, "fp8_e5m2": 1,
    "uint8": 1, "int8": 1,
}
WRITE_MODES = ("write_through", "write_back")

_INT, _STR, _BOOL = "int", "str", "bool"
SCHEMA: dict[str, Any] = {
    "chunk_tokens": _INT,
    "layout": _STR,
    "model": {"layers": _INT, "kv_heads": _INT, "head_size": _INT, "dtype": _STR,
              "dtype_size": _INT, "block_size": _INT},
    "salt": {"model_id": _STR, "kv_dtype": _STR, "tp_rank": _INT, "tp_size": _INT,
             "tenant": _STR},
    "max_tokens": _INT, "max_inflight": _INT, "max_pins": _INT, "write_queue_depth": _INT,
    "store_partial_tail": _BOOL, "write_mode": _STR,
    "host": {"capacity_bytes": _INT, "prefault": _BOOL},
    "shared_host": {"name": _STR, "capacity_bytes": _INT, "processes": _INT, "create": _BOOL,
                    "verify": _BOOL, "timeout_ms": _INT, "writers": _INT},
    "local_disk": {"path": _STR, "capacity_bytes": _INT, "direct_io": _BOOL,
                   "use_io_uring": _BOOL, "writers": _INT, "preallocate": _BOOL,
                   "sync_each_batch": _BOOL},
}
REQUIRED = {"model": ("layers", "kv_heads", "head_size", "block_size"), "local_disk": ("path",)}


class ConfigError(_kvtier.InvalidArgument):
    """A configuration key that is unknown, missing, or of the wrong type or value."""


def load(source: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """Reads a config dict, or a ``.json`` / ``.yaml`` / ``.yml`` file, and checks it."""
    return check(dict(source) if isinstance(source, Mapping) else read(source))


def read(source: str | os.PathLike) -> dict[str, Any]:
    """The mapping a ``.json`` / ``.yaml`` / ``.yml`` config file holds, not yet checked."""
    path = os.fspath(source)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"kvtier: config file '{path}' cannot be read: {e.strerror}") from None
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"kvtier: config file '{path}' is YAML; pip install pyyaml") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"kvtier: config file '{path}' is not valid YAML: {e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"kvtier: config file '{path}' is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"kvtier: config file '{path}' holds a {type(data).__name__}, not a mapping")
    return data


def _check_type(key: str, value: Any, kind: str) -> None:
    ok = {
        _INT: isinstance(value, int) and not isinstance(value, bool),
        _STR: isinstance(value, str),
        _BOOL: isinstance(value, bool),
    }[kind]
    if not ok:
        raise ConfigError(f"kvtier: config key '{key}' is {value!r} ({type(value).__name__}), "
                          f"expected {kind}")
    if kind == _INT and value < 0:
        raise ConfigError(f"kvtier: config key '{key}' is {value}, expected a non-negative int")


def _walk(data: Mapping[str, Any], schema: Mapping[str, Any], prefix: str) -> None:
    for key, value in data.items():
        path = prefix + str(key)
        if key not in schema:
            known = ", ".join(sorted(schema))
            raise ConfigError(f"kvtier: config key '{path}' is unknown (known: {known})")
        kind = schema[key]
        if isinstance(kind, dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"kvtier: config key '{path}' is {value!r}, expected a mapping")
            _walk(value, kind, path + ".")
        else:
            _check_type(path, value, kind)


def check(cfg: dict[str, Any]) -> dict[str, Any]:
    """Checks every key and fills in model.dtype_size from model.dtype; returns a new dict."""
    _walk(cfg, SCHEMA, "")
    out = json.loads(json.dumps(cfg))  # a deep copy of plain values
    model = out.setdefault("model", {})
    for section, keys in REQUIRED.items():
        if section == "model" or section in out:
            for k in keys:
                if k not in out.get(section, {}):
                    raise ConfigError(f"kvtier: config key '{section}.{k}' is missing")
    if "dtype" in model:
        name = model["dtype"].removeprefix("torch.")
        if name not in DTYPE_SIZES:
            raise ConfigError(f"kvtier: config key 'model.dtype' is '{model['dtype']}' "
                              f"(known: {', '.join(sorted(DTYPE_SIZES))})")
        size = DTYPE_SIZES[name]
        if model.setdefault("dtype_size", size) != size:
            raise ConfigError(f"kvtier: config key 'model.dtype_size' is {model['dtype_size']}, "
                              f"but model.dtype {name} has {size}-byte elements")
        del model["dtype"]
    elif "dtype_size" not in model:
        raise ConfigError("kvtier: config key 'model.dtype' (or model.dtype_size) is missing")
    chunk = out.setdefault("chunk_tokens", 256)
    if chunk not in _kvtier.chunk_sizes:
        raise ConfigError(f"kvtier: config key 'chunk_tokens' is {chunk}; the package is built "
                          f"for {', '.join(map(str, _kvtier.chunk_sizes))}")
    layout = out.setdefault("layout", "vllm_cpu")
    if layout not in _kvtier.layouts:
        raise ConfigError(f"kvtier: config key 'layout' is '{layout}'; the package is built for "
                          f"{', '.join(_kvtier.layouts)}")
    mode = out.get("write_mode", "write_through")
    if mode not in WRITE_MODES:
        raise ConfigError(f"kvtier: config key 'write_mode' is '{mode}' "
                          f"(known: {', '.join(WRITE_MODES)})")
    return out
