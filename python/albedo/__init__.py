"""albedo — Moondream vision-language inference in C, for Python.

A thin ctypes binding over libalbedo: every bit of model logic, including
the JSON of the results, is the C library's. The methods and return values
are those of the official ``moondream`` client (``md.vl(...)``)::

    import albedo
    model = albedo.vl(model="moondream2")        # a directory, "moondream2", "moondream3" or "owner/repo[@rev]"
    model.caption("photo.jpg")                    # {"caption": "..."}
    model.query(image, "What is this?")           # {"answer": "..."}
    model.detect(image, "face")                   # {"objects": [{"x_min": ..., ...}]}
    model.point(image, "eye")                     # {"points": [{"x": ..., "y": ...}]}
    for piece in model.caption(image, stream=True)["caption"]:
        print(piece, end="")

Images may be file paths, bytes (JPEG/PNG/WebP/GIF), PIL images, data URLs,
objects with an ``image_url`` data URL (moondream's Base64EncodedImage), or
what ``encode_image`` returned: the vision encoder then runs only once for
any number of questions.

Thread safety: a model holds a small pool of sessions (``sessions=N``); each
call takes one for its duration, so calls from many threads are safe and N
of them run at once.
"""
from ._vl import VL, AlbedoError, EncodedImage, fetch, vl
from ._lib import version as _version

__version__ = _version().decode()

__all__ = ["vl", "VL", "EncodedImage", "AlbedoError", "fetch", "__version__"]
