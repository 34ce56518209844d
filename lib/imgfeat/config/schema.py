"""The settings, as typed dataclasses with their defaults: the single source of truth.

``conf/default.yaml`` documents them (a test keeps the two equal).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A setting is unknown or has a wrong value; the message names it."""


@dataclass
class MultiLabelConfig:
    """A delimited findings column of the manifest (NIH ChestX-ray14's ``Finding Labels``: Cardiomegaly|Effusion)."""

    # The manifest column holding the findings; null = not a delimited multi-label manifest.
    column: str | None = None
    sep: str = "|"
    # The value meaning "no finding" (labels = []).
    none_value: str | None = "No Finding"


@dataclass
class LabelConfig:
    # auto: manifest when input.label.manifest is given, else folder; folder: a folder name; manifest: a CSV;
    # dicom_tag: a DICOM attribute of each file (input.label.dicom_tag); none: no labels (scoring).
    mode: Literal["auto", "folder", "manifest", "dicom_tag", "none"] = "auto"
    # 1 = the image's parent folder (root/CLASS/img.jpg), 2 = the folder above that, ...
    folder_level: int = 1
    # Folder labels: a regex with one capture group applied to the folder's name; the group is the label
    # (MURA's study1_negative with ^study\d+_(\w+)$ -> negative). null = the whole name.
    folder_pattern: str | None = None
    # A manifest (.csv, .csv.gz or .parquet) with a path column and a label column (path absolute, relative to
    # input.path, or a bare file name unique in the folder); implies mode=manifest.
    manifest: str | None = None
    # The manifest's column holding the image path ("Image Index" for NIH ChestX-ray14).
    path_column: str = "path"
    # Multi-label manifests (docs/labels.md): a delimited findings column (multi.column) ...
    multi: MultiLabelConfig = field(default_factory=MultiLabelConfig)
    # ... or one manifest column per finding (1 / 0 / -1 uncertain / blank), named here; with multi.column: the
    # known findings (others are an error). [] = single-label (or, with multi.column, every finding named).
    findings: list[str] = field(default_factory=list)
    # Per-finding columns: -1 (uncertain) is ignore (unknown: out of loss and metrics) | zeros | ones.
    uncertain: Literal["ignore", "zeros", "ones"] = "ignore"
    # Per-finding columns: a blank cell is zeros (negative: "not mentioned") | ignore (unknown).
    blank: Literal["zeros", "ignore"] = "zeros"
    # mode=dicom_tag: the DICOM attribute keyword whose value is the label (e.g. StudyDescription, BodyPartExamined).
    # Patient/study identifiers (PatientName, PatientID, AccessionNumber, StudyInstanceUID, ...: config/phi.py)
    # are refused: labels are logged to MLflow.
    dicom_tag: str | None = None

    @property
    def effective_mode(self) -> str:
        if self.mode == "auto":
            return "manifest" if self.manifest else "folder"
        return self.mode

    @property
    def is_multi(self) -> bool:
        """Multi-label: a delimited findings column or per-finding columns."""
        return bool(self.multi.column or self.findings)


@dataclass
class StudyConfig:
    """Which images form one study (``study_id``); unset: DICOM files' own study (study_key) where known."""

    # A manifest column holding the study (e.g. CheXpert's study folder, an accession number).
    column: str | None = None
    # A regex with one capture group on the image's path relative to input.path; ^(.*)/[^/]+$ = its folder.
    pattern: str | None = None

    @property
    def configured(self) -> bool:
        return bool(self.column or self.pattern)


@dataclass
class SplitConfig:
    # none: no split column; hash: seeded hash of image_id (or of the image's group), stable across runs;
    # folder: the folder name at folder_level (e.g. root/train/NORMAL/x.jpg -> "train").
    mode: Literal["none", "hash", "folder"] = "none"
    test_fraction: float = 0.2
    seed: int = 42
    folder_level: int = 2
    # Keep every image of a group (a patient) on one side of the split: none | regex (group_pattern on the file
    # name) | manifest_column (group_column of the label manifest) | patient_key (DICOM, with the formats issue).
    # The group is stored per row (group_id) and train's hash split uses it too.
    group: Literal["none", "regex", "manifest_column", "patient_key"] = "none"
    # A regex with one capture group, applied to the file name, or a preset: kermany (person1234_bacteria_1.jpeg,
    # IM-0123-0001.jpeg, NORMAL2-IM-0123-0001.jpeg) | nih (00001280_004.png: the first 8 digits).
    group_pattern: str | None = None
    # What group_pattern is applied to: name (the file name) | path (the path relative to input.path, e.g. MURA's
    # (patient\d+)/ for XR_ELBOW/patient00011/study1_negative/image1.png).
    group_source: Literal["name", "path"] = "name"
    # The label manifest's column that holds the group (group: manifest_column).
    group_column: str | None = None


@dataclass
class InputConfig:
    path: str | None = None
    extensions: list[str] = field(
        default_factory=lambda: ["jpg", "jpeg", "png", "bmp", "tif", "tiff", "gif", "webp", "dcm", "dicom", "nii", "nii.gz"]
    )
    # Files without an extension (PACS exports): listed as images (non-DICOM ones end in the errors table as
    # not_an_image) or ignored like other files.
    extensionless: Literal["include", "ignore"] = "include"
    # Files larger than this are not read; they go to the errors table as too_large.
    max_file_bytes: int = 256 * 1024 * 1024
    label: LabelConfig = field(default_factory=LabelConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    study: StudyConfig = field(default_factory=StudyConfig)


@dataclass
class ModelConfig:
    name: str = "resnet50"
    # imagenet (Keras cache, torch hub cache, or the package that ships them), none (seeded random init),
    # or a path to a weights file (.h5/.weights.h5 for Keras backbones, a .pth state dict for torch ones).
    weights: str = "imagenet"
    # Optional pin: the job stops if the weights file's sha256 differs.
    weights_sha256: str | None = None
    seed: int = 42


@dataclass
class DicomConfig:
    # auto: the file's VOI LUT / Window Centre+Width, else its value range | none: the value range | C,W: centre and
    # width in modality units (HU for CT), e.g. -600,1500 | lung | mediastinum | bone (CT presets).
    window: str = "auto"


@dataclass
class PreprocessConfig:
    # Model input size in pixels; 0 = the backbone's own (224 for resnet50, 299 for inception_v3).
    image_size: int = 0
    # stretch: resize to a square ignoring aspect; pad: keep aspect, pad with black; crop: centre crop.
    resize_mode: Literal["stretch", "pad", "crop"] = "stretch"
    resample: Literal["nearest", "bilinear", "bicubic", "lanczos", "box"] = "bilinear"
    # High-bit-depth images (16-bit, 32-bit): minmax stretches each image's own range to 0..255;
    # full_range maps the type's full range (0..65535) to 0..255.
    high_bit_depth: Literal["minmax", "full_range"] = "minmax"
    # Decompression-bomb guard: images with more pixels are rejected as too_large.
    max_pixels: int = 120_000_000
    # Decode large JPEGs at reduced size (DCT scaling) before the resize.
    jpeg_draft: bool = True
    # Only these formats (as detected from the bytes) are decoded; others -> unsupported_format.
    formats: list[str] = field(
        default_factory=lambda: ["JPEG", "PNG", "BMP", "TIFF", "GIF", "WEBP", "MPO", "DICOM", "NIFTI"]
    )
    dicom: DicomConfig = field(default_factory=DicomConfig)
    # Volumes (multi-frame DICOM, NIfTI): middle (the middle axial slice) | mip (maximum intensity projection) |
    # slices:N (N evenly spaced axial slices, one row each, with slice_index).
    volume: str = "middle"
    # Wall-clock seconds one file may take to decode; past it the file is a timed_out error row and the worker goes
    # on (0 = no limit). Not recorded with the rows: it never changes the pixels.
    decode_timeout_s: float = 60.0


@dataclass
class InferenceConfig:
    # auto: the backbone's own engine (keras for resnet50 ..., torch for efficientnet_lite0, tv_*); keras | torch
    # name it explicitly (a backbone of the other engine is refused with the choices).
    engine: Literal["auto", "keras", "torch"] = "auto"
    batch_size: int = 32
    # Threads of the inference framework (TensorFlow or PyTorch) per Python worker; 0 = cores / task slots.
    # (Formerly inference.tf_threads, still accepted with a warning.)
    threads: int = 0
    device: Literal["auto", "cpu", "gpu"] = "auto"
    # Arithmetic of the model: fp32 | bf16 (Keras mixed_bfloat16, torch bf16 autocast; fast on CPUs with AVX512_BF16
    # or AMX and on recent GPUs) | fp16 (GPU only). Recorded with the features: rows of two precisions never mix.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # Rows per Arrow batch handed to the UDF (images are large rows).
    arrow_batch_rows: int = 64
    # Bytes per Arrow batch (Spark 4+: spark.sql.execution.arrow.maxBytesPerBatch, 1..2^31-1): a batch closes once
    # it reaches this, so it holds at most this plus one file, not arrow_batch_rows x input.max_file_bytes.
    arrow_batch_bytes: int = 256 * 1024 * 1024
    # Images per featurizing read task (0 = auto: 512 on CPUs, 8192 where tasks get GPUs): tasks of this size, in a
    # multiple of the task slots, finishing together; each task pays a fixed set-up (docs/clusters.md).
    images_per_task: int = 0
    # Decode images in this many threads inside each Python worker (Pillow releases the GIL).
    decode_threads: int = 1
    # Decode the next Arrow batch in a thread while the model runs on this one.
    prefetch: bool = True
    # pillow | nvjpeg: JPEGs decoded in batches on the GPU (torch engine, CUDA; needs torchvision), resized there;
    # other formats and JPEGs nvJPEG refuses go through Pillow. Recorded with the features (docs/benchmarks.md).
    jpeg_decoder: Literal["pillow", "nvjpeg"] = "pillow"
    # torch.compile the backbone (torch engine; pays a compilation per worker, worth it on GPUs).
    compile: bool = False
    # Build the model in the Python workers while the driver lists files.
    warmup: bool = True


@dataclass
class OutputConfig:
    path: str | None = None
    # Defaults to "<path>_errors".
    errors_path: str | None = None
    format: Literal["auto", "delta", "parquet"] = "auto"
    # incremental: only files not yet in the tables; overwrite: recompute everything.
    mode: Literal["incremental", "overwrite"] = "incremental"
    # Also store a float16 copy of the features (half the size).
    float16_column: bool = False
    # A writing run's lease on a table expires this long after its last heartbeat (sent every ~10 s): then other
    # runs may remove what it left. Same-backbone writers are refused while a lease is live.
    lease_timeout_s: float = 120.0
    # Folder for the writers' leases of tables named catalog.schema.table (null: spark.sql.warehouse.dir).
    lease_dir: str | None = None


@dataclass
class SparkConfig:
    # None: the master from spark-submit / the running session, else local[*].
    master: str | None = None
    app_name: str = "imgfeat"
    driver_memory: str = "4g"
    conf: dict[str, str] = field(default_factory=dict)


@dataclass
class HeadParamsConfig:
    """Hyperparameters of the heads when no grid search runs (train.cv_folds=0, validation_fraction=0)."""

    lr_max_iter: int = 100
    lr_reg_param: float = 0.01
    lr_elastic_net_param: float = 0.0
    rf_num_trees: int = 50
    rf_max_depth: int = 8
    dt_max_depth: int = 6
    gbt_max_iter: int = 20
    gbt_max_depth: int = 4
    svc_max_iter: int = 100
    svc_reg_param: float = 0.01


@dataclass
class GridConfig:
    """Small grids searched by CrossValidator (train.cv_folds >= 2) or TrainValidationSplit."""

    lr_reg_param: list[float] = field(default_factory=lambda: [0.0, 0.01, 0.1])
    lr_elastic_net_param: list[float] = field(default_factory=lambda: [0.0, 0.5])
    rf_num_trees: list[int] = field(default_factory=lambda: [20, 50])
    rf_max_depth: list[int] = field(default_factory=lambda: [5, 10])
    dt_max_depth: list[int] = field(default_factory=lambda: [4, 8])
    gbt_max_depth: list[int] = field(default_factory=lambda: [3, 5])
    svc_reg_param: list[float] = field(default_factory=lambda: [0.0, 0.01, 0.1])


@dataclass
class KerasHeadConfig:
    """The ``keras`` head: a softmax (hidden_units=0) or one-hidden-layer net fed through Petastorm."""

    hidden_units: int = 0
    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 0.01
    # Petastorm's Parquet cache for make_spark_converter (file:///... locally, dbfs:/... on Databricks).
    cache_dir: str = "file:///tmp/imgfeat-petastorm"


@dataclass
class ValidityConfig:
    """Leakage checks and uncertainty (docs/validity.md)."""

    # Refuse a table whose train and test share a group (a patient); --allow-group-overlap.
    allow_group_overlap: bool = False
    # Refuse exact duplicates (same file content) across train and test; --allow-duplicates.
    allow_duplicates: bool = False
    # Refuse identical files (same content) with differing labels, in train and finetune; --allow-label-conflicts.
    allow_label_conflicts: bool = False
    # Near duplicates: perceptual hashes at most this many bits apart (of 256; on Kermany, re-encoded copies were
    # <= 6 bits apart and distinct X-rays >= 42).
    near_duplicate_bits: int = 12
    # 95 % bootstrap intervals for every test metric: resamples of test images (of groups, when grouped).
    bootstrap_resamples: int = 1000
    confidence: float = 0.95
    # Binary tasks: the operating point (threshold) reaching this sensitivity, with its specificity.
    target_sensitivity: float = 0.95
    # Expected calibration error: equal-width confidence bins.
    calibration_bins: int = 10


@dataclass
class TrainConfig:
    # Features table written by `extract` (path, or catalog.schema.table with Delta).
    features: str | None = None
    # lr, rf, dt (MLlib), gbt (GBT; one-vs-rest for >2 classes), svc (LinearSVC; one-vs-rest), keras.
    heads: list[str] = field(default_factory=lambda: ["lr", "rf", "dt"])
    # Backbones to train on; empty = every backbone (model + weights id) in the features table.
    backbones: list[str] = field(default_factory=list)
    # auto: the table's split column when it has train and test rows, else hash;
    # column: the split column (train/test) is required; hash: seeded, exactly stratified per class.
    split_mode: Literal["auto", "column", "hash"] = "auto"
    test_fraction: float = 0.2
    seed: int = 42
    # >= 2: CrossValidator with K folds over train.grid; 0: fixed train.params.
    cv_folds: int = 0
    # > 0 (and cv_folds=0): TrainValidationSplit over train.grid with this validation share.
    validation_fraction: float = 0.0
    # Weight each training row by n / (classes * class count) (imbalanced data).
    class_weighting: bool = False
    # Class whose precision/recall/F1 the comparison table shows; null = the last label in order.
    positive_class: str | None = None
    # Register the best child run's model in the Model Registry under this name.
    register: str | None = None
    # Metric that picks the best run (for register and compare): any test_* metric name (multi-label tables:
    # test_auc_macro when this is left at test_f1_macro).
    select_metric: str = "test_f1_macro"
    # Tag "dataset" of the runs; null = "features-" + a keyed hash of the table's location (never its name).
    dataset: str | None = None
    # Results per study / series (DICOM series_key) / patient (group_id) next to the image level: none | study |
    # series | patient; the study (series) is then part of the split unit, so a split never cuts one.
    aggregate: Literal["none", "study", "series", "patient"] = "none"
    # How the images' probabilities of one study become the study's: mean (MURA) | max | noisy_or.
    aggregation: Literal["mean", "max", "noisy_or"] = "mean"
    # Pool the slices of one volume (same path, several slice_index) into one row before the head: none | mean | max.
    pool_slices: Literal["none", "mean", "max"] = "none"
    # Multi-label: each finding's threshold, chosen on held-out training units: youden | sensitivity (reaching
    # train.validity.target_sensitivity).
    threshold: Literal["youden", "sensitivity"] = "youden"
    # Multi-label: share of the training units held out to choose the thresholds (0 = every threshold 0.5).
    threshold_fraction: float = 0.15
    params: HeadParamsConfig = field(default_factory=HeadParamsConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    keras: KerasHeadConfig = field(default_factory=KerasHeadConfig)
    validity: ValidityConfig = field(default_factory=ValidityConfig)


@dataclass
class PredictConfig:
    # runs:/RUN_ID/model or models:/NAME/VERSION (a model logged by `train`).
    model_uri: str | None = None
    # Also write one column per class with its probability.
    probability_columns: bool = True
    # A local copy of the weights file the model was trained with (its sha256 must match). By default predict
    # uses the file at the path recorded in the model, else the copy `train` logged with the run.
    weights: str | None = None
    # Multi-label models: also write one row per study (series, patient) to <output>_studies, its images'
    # probabilities combined: none | study (study_id) | series (series_key, DICOM) | patient (group_id).
    aggregate: Literal["none", "study", "series", "patient"] = "none"
    # How: mean | max | noisy_or; null = the aggregation the model was trained with (else mean).
    aggregation: Literal["mean", "max", "noisy_or"] | None = None


@dataclass
class FinetuneConfig:
    # Where the decoded training table, checkpoints and the run's outputs go (on a cluster: shared storage,
    # e.g. /dbfs/... or a volume, which the training processes and the driver both reach).
    output: str | None = None
    # Training processes (TorchDistributor num_processes), on the driver (local_mode) or as Spark tasks.
    num_processes: int = 2
    local_mode: bool = True
    use_gpu: bool = False
    # fp32 | bf16 (autocast; CPUs with AVX512-BF16 and GPUs).
    precision: Literal["fp32", "bf16"] = "fp32"
    # head (a new linear classifier only) | last:K (it and the backbone's last K blocks) | all.
    train_layers: str = "last:3"
    epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 1e-3  # the new head's; the backbone's is learning_rate x backbone_lr_scale
    backbone_lr_scale: float = 0.1
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.1  # of all steps: linear warm-up, then cosine decay to 0
    class_weighting: bool = True  # inverse class frequency in the loss
    # Share of the training images (by group when input.split.group is set) held out for validation.
    validation_fraction: float = 0.1
    patience: int = 2  # epochs without a better validation loss before stopping (0 = never stop early)
    seed: int = 42
    # Augmentation of radiographs: small rotations (degrees), shifts (fraction of the side), scale, brightness
    # and contrast (fractions); horizontal flips off (chest anatomy is lateralised).
    rotate_degrees: float = 7.0
    shift: float = 0.05
    scale: float = 0.1
    brightness: float = 0.1
    contrast: float = 0.1
    hflip: bool = False
    # Images per Parquet row group of the decoded table (the unit the training processes stream).
    row_group_images: int = 256


@dataclass
class ServeConfig:
    # runs:/RUN_ID (a child run of `train`), models:/NAME/VERSION, or a pyfunc model's own URI (--model-uri).
    model_uri: str | None = None
    # Loopback unless told otherwise; any other address needs a bearer token ($IMGFEAT_SERVE_TOKEN or --token).
    host: str = "127.0.0.1"
    port: int = 8000
    # Uploads larger than this are refused with 413 before they are read.
    max_upload_mb: float = 50.0
    # Requests admitted besides the one being scored (reading their body or waiting for the model), counted from
    # before their body is read; further ones get 503 (bounded memory).
    max_waiting: int = 32
    # Images admitted at once (being read, waiting or scored; a multipart upload counts its files); more: 503.
    max_images: int = 64
    # Seconds from admission to answer; then 504 and the request is dropped (the model thread skips it).
    request_timeout_s: float = 60.0
    # Seconds a client has to send a whole request body; a slower one gets 408.
    body_timeout_s: float = 60.0
    # Connections and requests uvicorn serves at once; more get 503 from uvicorn.
    limit_concurrency: int = 100
    # Seconds an idle keep-alive connection stays open.
    keep_alive_s: float = 5.0
    # Framework threads for the model (0 = all cores).
    threads: int = 0


@dataclass
class MlflowConfig:
    # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.
    tracking_uri: str | None = None
    experiment: str = "imgfeat"


@dataclass
class PrivacyConfig:
    # Secret mixed (HMAC-SHA256) into every id that MLflow artifacts and tags carry (held-out images, audit files
    # and groups, the dataset name), so that ids cannot be recovered by hashing guessed file names (which often
    # hold patient numbers). Also read from $IMGFEAT_ID_SALT; never logged. Unset: a random secret per run (ids
    # link within one run only) and no held-out images list, only a digest of the test set.
    id_salt: str | None = None


@dataclass
class Config:
    input: InputConfig = field(default_factory=InputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def errors_path(self) -> str | None:
        if self.output.errors_path:
            return self.output.errors_path
        return f"{self.output.path.rstrip('/')}_errors" if self.output.path else None
