"""The preprocessing a features table was made with, recorded per row, so that models reproduce it exactly.

Every row of the features and errors tables carries ``preprocess``: a canonical JSON of the engine, the
backbone's input preparation and every decode option (size, resize mode, resampling, bit depth, bomb guard,
JPEG draft, formats). ``train`` builds the logged model's featurizer from it (not from its own settings), and a
table that mixes settings for one backbone and weights is refused.
"""

from __future__ import annotations

import json
from typing import Any

from imgfeat.backbones.registry import Backbone
from imgfeat.io.decoders import DecodeOptions

COLUMN = "preprocess"


class SettingsError(ValueError):
    """A features table's recorded preprocessing is missing, mixed, or differs from what a run would use."""


def settings_json(backbone: Backbone, engine: str, decode: DecodeOptions, precision: str = "fp32",
                  jpeg_decoder: str = "pillow") -> str:
    """The canonical record; ``jpeg_decoder`` appears only when it is not Pillow (older tables stay equal)."""
    record = {"engine": engine, "input": backbone.preprocessing, "precision": precision, "decode": decode.to_dict()}
    if jpeg_decoder != "pillow":
        record["jpeg_decoder"] = jpeg_decoder  # nvJPEG's IDCT and the device resize differ slightly from Pillow's
    return json.dumps(record, sort_keys=True)


def decode_from_settings(text: str) -> DecodeOptions:
    return DecodeOptions.from_dict(json.loads(text)["decode"])


def precision_from_settings(text: str) -> str:
    return json.loads(text).get("precision", "fp32")


def describe_difference(recorded: str, wanted: str) -> str:
    """``key: recorded -> wanted`` for every setting that differs (for error messages)."""
    a, b = json.loads(recorded), json.loads(wanted)

    def flat(d: dict[str, Any]) -> dict[str, Any]:
        return {**{k: v for k, v in d.items() if k != "decode"}, **{f"preprocess.{k}": v for k, v in d.get("decode", {}).items()}}

    fa, fb = flat(a), flat(b)
    return ", ".join(f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k))
