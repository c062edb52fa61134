"""A pydicom decoding plugin for lossless JPEG and JPEG-LS through imagecodecs (libjpeg-turbo, CharLS).

These standards define the decoded samples exactly (JPEG-LS near-lossless too), so any correct decoder
gives the same frames; these two are several times faster than pydicom's own plugins for them. The
plugin hands pydicom the bytes its pylibjpeg plugin would (samples interleaved, 8 or 16 bits by
the codestream's precision) and sets the same options, so pydicom's processing after it is unchanged.
It is used through a Decoder of its own (`exact_decoder`), never added to pydicom's shared decoders:
what pydicom decodes elsewhere, and what a decoding problem names, stay as they were.
"""

from __future__ import annotations

import functools
from typing import Any

from pydicom import uid as uids
from pydicom.pixels.decoders.base import Decoder

SYNTAXES = frozenset({uids.JPEGLossless, uids.JPEGLosslessSV1, uids.JPEGLSLossless, uids.JPEGLSNearLossless})
DECODER_DEPENDENCIES = {ts: ("imagecodecs>=2024.1",) for ts in SYNTAXES}  # pydicom's plugin interface
LABEL = "imagecodecs"


def is_available(ts: str) -> bool:
    if ts not in SYNTAXES:
        return False
    try:
        import imagecodecs
    except ImportError:
        return False
    codec = imagecodecs.JPEGLS if ts in uids.JPEGLSTransferSyntaxes else imagecodecs.JPEG8
    return bool(codec.available)


def decode_frame(src: bytes, runner: Any) -> bytes:
    """One frame's samples, as pydicom's pylibjpeg plugin returns them (see the module's docstring)."""
    import imagecodecs

    if not bytes(src[-16:]).rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise ValueError("no end-of-image marker")  # cut short: left to pydicom's plugins to judge
    if runner.transfer_syntax in uids.JPEGLSTransferSyntaxes:
        arr = imagecodecs.jpegls_decode(src)
        runner.set_option("planar_configuration", 0)
        precision = runner.get_option("jls_precision", runner.bits_stored)
        if 0 < precision <= 8:
            runner.set_option("bits_allocated", 8)
        elif 8 < precision <= 16:
            runner.set_option("bits_allocated", 16)
    else:
        arr = imagecodecs.jpeg8_decode(src)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr.tobytes()


@functools.cache
def exact_decoder(ts: str) -> Decoder | None:
    """A pydicom Decoder for ts whose only plugin is this module's, or None when it does not apply."""
    if not is_available(ts):
        return None
    decoder = Decoder(uids.UID(ts))
    decoder.add_plugin(LABEL, (__name__, "decode_frame"))
    return decoder if decoder.is_available else None
