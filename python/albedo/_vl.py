"""The model object: the official client's methods over albedo sessions.

Results are the library's own response objects (albedo_result_json) parsed
with json, so they are the REST server's and the CLI's, number for number.
"""
import base64
import ctypes
import json
import os
import queue
import threading

from . import _lib

_SENTINEL = object()


class AlbedoError(RuntimeError):
    """A failing library call; ``status`` is the albedo_status name."""

    def __init__(self, status, message):
        self.status = status
        self.status_name = _lib.status_str(status).decode()
        super().__init__(f"{self.status_name}: {message}" if message else self.status_name)


def _check(st, detail):
    if st != _lib.OK:
        raise AlbedoError(st, detail() if callable(detail) else detail)


def _last_error():
    return _lib.last_error().decode("utf-8", "replace")


def fetch(spec, *, offline=None, endpoint=None, token=None, hub_cache=None, progress=None):
    """Resolve a model spec (directory, an alias "moondream2", "moondream3" or
    "moondream3.1", or "owner/repo[@rev]") to a directory, downloading into the
    Hugging Face cache if needed (sharded checkpoints too)."""
    p = _lib.fetch_params_default()
    keep = []
    for name, val in (("endpoint", endpoint), ("token", token), ("hub_cache", hub_cache)):
        if val is not None:
            b = os.fsencode(val) if name == "hub_cache" else val.encode()
            keep.append(b)
            setattr(p, name, b)
    if offline is not None:
        p.offline = 1 if offline else 0
    if progress is not None:
        cb = _lib.PROGRESS_FN(lambda user, f, done, total: progress(f.decode(), done, total))
        keep.append(cb)
        p.progress = cb
    out = ctypes.create_string_buffer(4096)
    _check(_lib.model_fetch(os.fsencode(spec), ctypes.byref(p), out, len(out)), _last_error)
    return os.fsdecode(out.value)


class EncodedImage:
    """An image after the vision encoder; reusable by every later call on the
    same model. Freed when garbage-collected (or by ``close()``)."""

    def __init__(self, owner, ptr):
        self._owner = owner
        self._ptr = ptr

    @property
    def size(self):
        w, h = ctypes.c_int(), ctypes.c_int()
        _lib.image_size(self._ptr, ctypes.byref(w), ctypes.byref(h))
        return w.value, h.value

    def close(self):
        if self._ptr:
            _lib.image_free(self._ptr)
            self._ptr = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _data_url_bytes(url):
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if not head.endswith(";base64"):
            raise ValueError("only base64 data URLs are supported")
        url = data
    return base64.b64decode(url, validate=False)


class VL:
    """A loaded model with a pool of sessions. Use ``albedo.vl(...)``."""

    def __init__(self, model=None, *, sessions=1, threads=0, backend=None, precision="f32", max_context=0,
                 offline=None, weights=None):
        spec = model or os.environ.get("ALBEDO_MODEL") or "moondream2"
        self.model_dir = fetch(spec, offline=offline)
        params = _lib.model_params_default()
        params.n_threads = int(threads)
        self._backend = backend.encode() if backend else None
        params.backend = self._backend
        params.max_context = int(max_context)
        if precision not in ("f32", "bf16"):
            raise ValueError("precision must be 'f32' or 'bf16'")
        params.precision = 1 if precision == "bf16" else 0
        if weights not in (None, "bf16", "q8", "q4", "fp8"):
            raise ValueError("weights must be 'bf16', 'q8', 'q4' or 'fp8'")
        self._weights = weights.encode() if weights else None
        params.weights = self._weights
        m = ctypes.c_void_p()
        _check(_lib.model_load(os.fsencode(self.model_dir), ctypes.byref(params), ctypes.byref(m)), _last_error)
        self._model = m
        self._all = []
        self._pool = queue.Queue()
        try:
            for _ in range(max(1, int(sessions))):
                s = ctypes.c_void_p()
                _check(_lib.session_new(m, ctypes.byref(s)), _last_error)
                self._all.append(s)
                self._pool.put(s)
        except Exception:
            self.close()
            raise

    @property
    def description(self):
        return _lib.model_describe(self._model).decode()

    # -- lifetime --------------------------------------------------------------
    def close(self):
        """Free the sessions and the model. Encoded images must not be used after."""
        for s in self._all:
            _lib.session_free(s)
        self._all = []
        if getattr(self, "_model", None):
            _lib.model_free(self._model)
            self._model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- sessions --------------------------------------------------------------
    def _take(self):
        if not self._all:
            raise RuntimeError("albedo: the model was closed")
        return self._pool.get()

    def _give(self, s):
        self._pool.put(s)

    # -- images ----------------------------------------------------------------
    def _encode_with(self, s, image):
        out = ctypes.c_void_p()
        if hasattr(image, "image_url") and isinstance(getattr(image, "image_url"), str):
            image = _data_url_bytes(image.image_url)
        if isinstance(image, str) and image.startswith("data:"):
            image = _data_url_bytes(image)
        if isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
            st = _lib.image_encode_bytes(s, data, len(data), ctypes.byref(out))
        elif isinstance(image, (str, os.PathLike)):
            st = _lib.image_encode_file(s, os.fsencode(image), ctypes.byref(out))
        elif hasattr(image, "convert") and hasattr(image, "tobytes") and hasattr(image, "size"):
            # A PIL image: its RGB pixels go straight in (no JPEG round trip).
            rgb = image.convert("RGB")
            w, h = rgb.size
            st = _lib.image_encode_rgb(s, rgb.tobytes(), w, h, ctypes.byref(out))
        else:
            raise TypeError(f"unsupported image type {type(image).__name__}: pass a path, bytes, a PIL image, "
                            "a data URL or an EncodedImage")
        _check(st, lambda: _lib.session_error(s).decode("utf-8", "replace"))
        return EncodedImage(self, out)

    def encode_image(self, image):
        """Run the vision encoder once; pass the result to any later call."""
        if isinstance(image, EncodedImage):
            return image
        s = self._take()
        try:
            return self._encode_with(s, image)
        finally:
            self._give(s)

    # -- requests --------------------------------------------------------------
    def _request(self, skill, settings, **fields):
        r = _lib.request_default(skill)
        keep = []
        if fields.get("question") is not None:
            b = fields["question"].encode()
            keep.append(b)
            r.question = b
        if fields.get("object") is not None:
            b = fields["object"].encode()
            keep.append(b)
            r.object = b
        if "length" in fields:
            if fields["length"] not in _lib.LENGTHS:
                raise ValueError("length must be 'short', 'normal' or 'long'")
            r.length = _lib.LENGTHS[fields["length"]]
        r.reasoning = 1 if fields.get("reasoning") else 0
        refs = fields.get("spatial_refs")
        if refs:
            arr = (_lib.SpatialRef * len(refs))()
            for i, ref in enumerate(refs):
                if len(ref) not in (2, 4):
                    raise ValueError("spatial_refs entries are [x, y] or [x1, y1, x2, y2]")
                arr[i].n = len(ref)
                for k, v in enumerate(ref):
                    arr[i].v[k] = float(v)
            keep.append(arr)
            r.spatial_refs = arr
            r.n_spatial_refs = len(refs)
        for key, val in (settings or {}).items():
            if key in ("temperature", "top_p"):
                setattr(r, key, float(val))
            elif key in ("max_tokens", "max_objects", "seed"):
                setattr(r, key, int(val))
            # other keys (variant, adapter, ...) mean nothing to a local model
        return r, keep

    def _run(self, image, req, keep, on_text=None):
        """Run on a pooled session; returns the parsed response object."""
        s = self._take()
        img = None
        try:
            if image is not None:
                img = image if isinstance(image, EncodedImage) else self._encode_with(s, image)
                req.image = img._ptr
            if on_text is not None:
                cb = _lib.TEXT_FN(on_text)
                keep.append(cb)
                req.on_text = cb
            res = ctypes.POINTER(_lib.Result)()
            st = _lib.session_run(s, ctypes.byref(req), ctypes.byref(res))
            _check(st, lambda: _lib.session_error(s).decode("utf-8", "replace"))
            return json.loads(_lib.result_json(s, res, 0).decode("utf-8"))
        finally:
            if img is not None and not isinstance(image, EncodedImage):
                img.close()
            self._give(s)

    def _stream(self, image, req, keep, key):
        """A generator of text pieces; the run happens on a helper thread and
        stops (ALBEDO_ERR_CANCELLED) when the generator is closed early."""
        q = queue.Queue()
        stop = threading.Event()

        def on_text(user, text, n):
            q.put(ctypes.string_at(text, n).decode("utf-8", "replace"))
            return 1 if stop.is_set() else 0

        def work():
            try:
                out = self._run(image, req, keep, on_text)
                q.put(("done", out))
            except AlbedoError as e:
                q.put(("error", None if e.status == _lib.ERR_CANCELLED else e))
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                q.put(("error", e))

        def gen():
            t = threading.Thread(target=work, daemon=True)
            t.start()
            try:
                while True:
                    item = q.get()
                    if isinstance(item, str):
                        yield item
                        continue
                    if item[0] == "error" and item[1] is not None:
                        raise item[1]
                    gen.result = item[1]
                    return
            finally:
                stop.set()
                t.join()

        return {key: gen()}

    # -- the official client's methods ---------------------------------------------
    def caption(self, image, length="normal", stream=False, settings=None):
        req, keep = self._request(_lib.SKILL_CAPTION, settings, length=length)
        if stream:
            return self._stream(image, req, keep, "caption")
        return self._run(image, req, keep)

    def query(self, image=None, question=None, stream=False, settings=None, reasoning=False, spatial_refs=None):
        if question is None:
            raise ValueError("question parameter is required")
        req, keep = self._request(_lib.SKILL_QUERY, settings, question=question, reasoning=reasoning,
                                  spatial_refs=spatial_refs)
        if stream:
            return self._stream(image, req, keep, "answer")
        return self._run(image, req, keep)

    def detect(self, image, object, settings=None):  # noqa: A002 - the official client's name
        req, keep = self._request(_lib.SKILL_DETECT, settings, object=object)
        return self._run(image, req, keep)

    def point(self, image, object, settings=None, spatial_refs=None):  # noqa: A002
        req, keep = self._request(_lib.SKILL_POINT, settings, object=object)
        return self._run(image, req, keep)


def vl(model=None, **kwargs):
    """Load a model: a directory, an alias ("moondream2", "moondream3",
    "moondream3.1") or a Hugging Face "owner/repo[@rev]"
    (default $ALBEDO_MODEL, else moondream2). Keyword options: sessions,
    threads, backend, precision ("f32"/"bf16"), weights ("bf16"/"q8"/"q4":
    the text decoder's weights, quantised at load; "fp8": Moondream 3's
    experts as e4m3 on backend "cuda"), max_context, offline."""
    kwargs.pop("api_key", None)  # accepted for drop-in use with md.vl(); meaningless locally
    return VL(model, **kwargs)
