"""What a worker needs to featurize (``FeaturizeSpec``), built in one place from the settings that make it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from imgfeat.backbones.registry import Backbone
from imgfeat.backbones.weights import WeightsSource
from imgfeat.io.decoders import DecodeOptions

if TYPE_CHECKING:
    from imgfeat.config.schema import InferenceConfig, LabelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeaturizeSpec:
    """Everything a worker needs, small and picklable (the weights travel as a broadcast)."""

    backbone: Backbone  # the registry entry itself, so backbones registered on the driver work on workers
    weights: WeightsSource
    decode: DecodeOptions
    batch_size: int = 32
    threads: int = 1  # framework threads per Python worker (resolved: session.threads_for)
    device: str = "auto"
    precision: str = "fp32"
    decode_threads: int = 1
    prefetch: bool = True  # decode the next batch while the model runs on this one
    compile: bool = False  # torch.compile (torch engine)
    jpeg_decoder: str = "pillow"  # pillow | nvjpeg (JPEGs decoded on the model's GPU)
    float16_column: bool = False
    # Secret keying DICOM patient ids (privacy.id_salt); kept out of ``decode``, which is recorded with the rows.
    id_salt: str | None = field(default=None, repr=False)
    # input.label.mode=dicom_tag: the DICOM attribute whose value is the label (e.g. StudyDescription).
    label_tag: str | None = None

    @property
    def model_name(self) -> str:
        return self.backbone.name

    def engine_options(self) -> Any:
        """The engine's options for this spec (what the worker's cached predictor is keyed by)."""
        from imgfeat.engines import EngineOptions

        return EngineOptions(threads=self.threads, device=self.device, precision=self.precision,
                             input_size=self.decode.size, compile=self.compile, jpeg_decoder=self.jpeg_decoder)


def torch_only_settings(engine: str, inference: InferenceConfig, model: str = "") -> tuple[str, bool]:
    """(jpeg_decoder, compile) as they apply to a backbone on ``engine``: both are the torch engine's; a Keras
    backbone in the same job decodes with Pillow and runs uncompiled (said once in the log, not refused, so that
    one job can extract torch and Keras backbones with the same settings)."""
    decoder, compiled = inference.jpeg_decoder, inference.compile
    if engine != "torch" and (decoder != "pillow" or compiled):
        log.info("%s runs on the %s engine: inference.jpeg_decoder=%s and inference.compile=%s apply to torch "
                 "backbones only; this one decodes with Pillow, uncompiled", model, engine, decoder, compiled)
        return "pillow", False
    return decoder, compiled


def dicom_label_tag(label: LabelConfig) -> str | None:
    """The DICOM attribute whose value is each file's label (input.label.mode=dicom_tag), else None."""
    return label.dicom_tag if label.effective_mode == "dicom_tag" else None


def featurize_spec(backbone: Backbone, weights: WeightsSource, decode: DecodeOptions, inference: InferenceConfig,
                   threads: int, id_salt: str | None = None, label_tag: str | None = None,
                   float16_column: bool = False) -> FeaturizeSpec:
    """The spec of ``backbone`` with ``weights``, decoding by ``decode``, run by the ``inference`` settings with
    ``threads`` framework threads per worker (``session.threads_for(spark, inference.threads)``); ``id_salt`` keys
    DICOM patient ids, ``label_tag`` (``dicom_label_tag``) reads labels from a DICOM attribute."""
    decoder, compiled = torch_only_settings(backbone.engine, inference, backbone.name)
    return FeaturizeSpec(
        backbone=backbone,
        weights=weights,
        decode=decode,
        batch_size=inference.batch_size,
        threads=threads,
        device=inference.device,
        precision=inference.precision,
        decode_threads=inference.decode_threads,
        prefetch=inference.prefetch,
        compile=compiled,
        jpeg_decoder=decoder,
        float16_column=float16_column,
        id_salt=id_salt,
        label_tag=label_tag,
    )
