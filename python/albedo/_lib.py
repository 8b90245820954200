"""ctypes declarations of include/albedo.h and the search for libalbedo.

Where the shared library is looked for, first hit wins:

1. ``$ALBEDO_LIBRARY`` — a path to ``libalbedo.so`` (e.g. ``build/libalbedo.so``
   of a CMake build, used by the tests with ``PYTHONPATH=python``);
2. inside the installed package (``pip install .`` puts it in ``albedo/lib``);
3. the system's library path (``ctypes.util.find_library("albedo")``).

The structures mirror albedo.h field by field; keep them in sync with it.
"""
import ctypes
import ctypes.util
import glob
import os
import sys
from ctypes import (CFUNCTYPE, POINTER, Structure, c_char, c_char_p, c_double, c_float, c_int, c_int32,
                    c_int64, c_long, c_size_t, c_uint64, c_void_p)

# albedo_status
OK = 0
ERR_INVALID_ARGUMENT = 1
ERR_IO = 2
ERR_IMAGE = 5
ERR_LIMIT = 6
ERR_CANCELLED = 8
ERR_NETWORK = 10

SKILL_CAPTION, SKILL_QUERY, SKILL_DETECT, SKILL_POINT = 0, 1, 2, 3
LENGTHS = {"normal": 0, "short": 1, "long": 2}


class ModelParams(Structure):
    _fields_ = [("n_threads", c_int), ("precision", c_int), ("backend", c_char_p), ("max_context", c_int),
                ("max_image_side", c_int), ("max_image_pixels", c_int64), ("weights", c_char_p),
                ("kv_dtype", c_char_p)]  # include/albedo.h's layout, field for field


class SpatialRef(Structure):
    _fields_ = [("n", c_int), ("v", c_double * 4)]


TEXT_FN = CFUNCTYPE(c_int, c_void_p, POINTER(c_char), c_size_t)
PROGRESS_FN = CFUNCTYPE(None, c_void_p, c_char_p, c_uint64, c_uint64)


class Request(Structure):
    _fields_ = [("skill", c_int), ("image", c_void_p), ("question", c_char_p), ("object", c_char_p),
                ("length", c_int), ("reasoning", c_int), ("spatial_refs", POINTER(SpatialRef)),
                ("n_spatial_refs", c_int), ("temperature", c_float), ("top_p", c_float), ("max_tokens", c_int),
                ("max_objects", c_int), ("seed", c_uint64), ("ignore_eos", c_int), ("on_text", TEXT_FN),
                ("user", c_void_p)]


class Metrics(Structure):
    _fields_ = [("input_tokens", c_int), ("output_tokens", c_int), ("cached_tokens", c_int),
                ("prefill_time_ms", c_double), ("decode_time_ms", c_double), ("ttft_ms", c_double),
                ("queue_time_ms", c_double)]


class Result(Structure):
    _fields_ = [("skill", c_int), ("text", c_char_p), ("reasoning", c_char_p), ("n_grounding", c_int),
                ("grounding", c_void_p), ("n_objects", c_int), ("objects", c_void_p), ("n_points", c_int),
                ("points", c_void_p), ("finish", c_int), ("metrics", Metrics), ("tokens", POINTER(c_int32)),
                ("n_tokens", c_int), ("text_len", c_size_t), ("reasoning_len", c_size_t)]


class FetchParams(Structure):
    _fields_ = [("endpoint", c_char_p), ("token", c_char_p), ("hub_cache", c_char_p), ("albedo_cache", c_char_p),
                ("offline", c_int), ("max_retries", c_int), ("connect_timeout_s", c_long),
                ("progress", PROGRESS_FN), ("user", c_void_p)]


def _candidates():
    env = os.environ.get("ALBEDO_LIBRARY")
    if env:
        yield env
    here = os.path.dirname(os.path.abspath(__file__))
    names = {"win32": "albedo*.dll", "darwin": "libalbedo*.dylib"}.get(sys.platform, "libalbedo.so*")
    for sub in ("lib", "lib64", "bin", "."):
        for p in sorted(glob.glob(os.path.join(here, sub, names))):
            yield p
    found = ctypes.util.find_library("albedo")
    if found:
        yield found


def _load():
    errors = []
    for path in _candidates():
        try:
            return ctypes.CDLL(path)
        except OSError as e:
            errors.append(f"{path}: {e}")
    raise ImportError("albedo: cannot find libalbedo (set ALBEDO_LIBRARY to its path, or pip install the package)"
                      + ("; tried " + "; ".join(errors) if errors else ""))


lib = _load()


def _fn(name, restype, *argtypes):
    f = getattr(lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


status_str = _fn("albedo_status_str", c_char_p, c_int)
last_error = _fn("albedo_last_error", c_char_p)
version = _fn("albedo_version", c_char_p)
model_params_default = _fn("albedo_model_params_default", ModelParams)
model_load = _fn("albedo_model_load", c_int, c_char_p, POINTER(ModelParams), POINTER(c_void_p))
model_free = _fn("albedo_model_free", None, c_void_p)
model_describe = _fn("albedo_model_describe", c_char_p, c_void_p)
session_new = _fn("albedo_session_new", c_int, c_void_p, POINTER(c_void_p))
session_free = _fn("albedo_session_free", None, c_void_p)
session_error = _fn("albedo_session_error", c_char_p, c_void_p)
image_encode_file = _fn("albedo_image_encode_file", c_int, c_void_p, c_char_p, POINTER(c_void_p))
image_encode_bytes = _fn("albedo_image_encode_bytes", c_int, c_void_p, c_char_p, c_size_t, POINTER(c_void_p))
image_encode_rgb = _fn("albedo_image_encode_rgb", c_int, c_void_p, c_char_p, c_int, c_int, POINTER(c_void_p))
image_free = _fn("albedo_image_free", None, c_void_p)
image_size = _fn("albedo_image_size", None, c_void_p, POINTER(c_int), POINTER(c_int))
request_default = _fn("albedo_request_default", Request, c_int)
session_run = _fn("albedo_session_run", c_int, c_void_p, POINTER(Request), POINTER(POINTER(Result)))
result_json = _fn("albedo_result_json", c_char_p, c_void_p, POINTER(Result), c_int)
fetch_params_default = _fn("albedo_fetch_params_default", FetchParams)
model_fetch = _fn("albedo_model_fetch", c_int, c_char_p, POINTER(FetchParams), c_char_p, c_size_t)
