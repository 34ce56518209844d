"""The decoding budget: how many bytes one file may inflate to, and a gunzip that keeps to it in linear time.

Everything derives from ``preprocess.max_pixels`` (already recorded with the rows, so no new setting): a file's
raw pixel data (a NIfTI volume, all frames of a DICOM object, in their stored type) may hold at most
``BYTES_PER_PIXEL * max_pixels`` bytes (480 MB at the default 120 MP: the largest RGBA image Pillow's own guard
admits), and a compressed stream may inflate to that plus ``HEADER_ALLOWANCE`` for headers, NIfTI extensions
and DICOM attributes. Over it: ``too_large``, decided from the headers before any pixel array exists.
"""

from __future__ import annotations

import zlib
from typing import Any

from imgfeat.io.decoders.base import TOO_LARGE, TRUNCATED, DecodeError, DecodeOptions

BYTES_PER_PIXEL = 4
HEADER_ALLOWANCE = 16 << 20
# A gzip stream may hold this many members plus one per KiB it inflates to (writers make one member, BGZF one per
# <= 64 KiB): thousands of empty members are a bomb (``gzip.decompress`` is quadratic in them), not a NIfTI.
MEMBER_SLACK, BYTES_PER_MEMBER = 64, 1024


def max_decoded_bytes(options: DecodeOptions) -> int:
    """The most bytes of raw pixel data one file may decode to."""
    return BYTES_PER_PIXEL * options.max_pixels


def max_inflated_bytes(options: DecodeOptions) -> int:
    """The most bytes a compressed stream (gzip NIfTI, deflated DICOM) may inflate to."""
    return max_decoded_bytes(options) + HEADER_ALLOWANCE


def check_decoded_bytes(nbytes: int, what: str, options: DecodeOptions) -> None:
    """``too_large`` when ``nbytes`` of raw pixel data (described by ``what``) exceed the budget."""
    limit = max_decoded_bytes(options)
    if nbytes > limit:
        raise DecodeError(TOO_LARGE, f"{what} = {nbytes / 1e6:.1f} MB of pixel data exceeds the decoding budget of "
                                     f"{limit / 1e6:.0f} MB ({BYTES_PER_PIXEL} bytes x preprocess.max_pixels="
                                     f"{options.max_pixels}; decompression-bomb guard): raise preprocess.max_pixels "
                                     "to decode it")


class Inflater:
    """Streamed inflate of ``data`` (gzip, one or more members; or raw deflate with ``wbits=-15``), read forward.

    Never holds more than what ``read`` asks for plus one output chunk; raises ``too_large`` once more than
    ``cap`` bytes would come out, or when the members are too many for the output (MEMBER_SLACK). Linear time:
    input is fed in pieces that start small for every member and double (so the bytes zlib copies as
    ``unused_data`` / ``unconsumed_tail`` stay proportional to the stream); ``fed`` counts the bytes handed to
    zlib (the work), ``members`` the gzip members begun.
    """

    OUT_CHUNK, FEED_MIN, FEED_MAX = 1 << 20, 256, 64 << 10

    def __init__(self, data: bytes, cap: int, wbits: int = 31):
        self._src, self._pos, self._cap, self._wbits = memoryview(data), 0, cap, wbits
        self._zlib: Any = None  # the current member's zlib decompressobj
        self._feed, self._spare = self.FEED_MIN, memoryview(b"")
        self.fed = self.produced = self.members = 0
        self.done = False

    def _chunk(self, limit: int) -> bytes:
        """The next at most ``limit`` inflated bytes (b"" at the end of the stream)."""
        while not self.done:
            if self._zlib is None:
                if self._pos >= len(self._src) or (self.members and self._wbits < 0):
                    self.done = True
                    break
                self._zlib, self._feed = zlib.decompressobj(self._wbits), self.FEED_MIN
                self.members += 1
            piece = self._zlib.unconsumed_tail
            if not piece:
                piece = self._src[self._pos:self._pos + self._feed]
                self._pos += len(piece)
                self._feed = min(2 * self._feed, self.FEED_MAX)
            self.fed += len(piece)
            try:
                out = self._zlib.decompress(piece, min(limit, self.OUT_CHUNK))
            except zlib.error as exc:
                raise DecodeError(TRUNCATED, f"the compressed stream is corrupt at byte {self._pos}: {exc}") from None
            if self._zlib.eof:
                self._pos -= len(self._zlib.unused_data)
                self._zlib = None
                if self.members > MEMBER_SLACK + self.produced // BYTES_PER_MEMBER:
                    raise DecodeError(TOO_LARGE, f"a gzip stream of more than {self.members} members that inflate to "
                                                 f"{self.produced} bytes: a gzip bomb, not a file a writer makes")
            elif not out and not piece:
                raise DecodeError(TRUNCATED, f"the compressed stream ends early (after {len(self._src)} bytes, "
                                             f"{self.produced} inflated)")
            if out:
                self.produced += len(out)
                if self.produced > self._cap:
                    raise DecodeError(TOO_LARGE, f"the compressed stream inflates to more than {self._cap / 1e6:.0f} MB "
                                                 "(decompression-bomb guard: the decoding budget of "
                                                 "preprocess.max_pixels)")
                return out
        return b""

    def _consume(self, n: int, view: memoryview | None) -> int:
        """Take the next ``n`` inflated bytes, copied into ``view`` when given (else dropped); how many there were
        (fewer only at the end of the stream)."""
        done = 0
        while done < n:
            if not self._spare:
                self._spare = memoryview(self._chunk(n - done))
                if not self._spare:
                    break
            take = min(len(self._spare), n - done)
            if view is not None:
                view[done:done + take] = self._spare[:take]
            self._spare, done = self._spare[take:], done + take
        return done

    def readinto(self, view: memoryview) -> int:
        """Fill ``view`` with the next inflated bytes; how many there were (fewer only at the end of the stream)."""
        return self._consume(len(view), view)

    def read(self, n: int) -> bytearray:
        """The next ``n`` inflated bytes (fewer only at the end of the stream)."""
        out = bytearray(n)
        filled = self.readinto(memoryview(out))
        return out if filled == n else out[:filled]

    def skip(self, n: int) -> int:
        """Inflate and drop the next ``n`` bytes; how many there were."""
        return self._consume(n, None)
