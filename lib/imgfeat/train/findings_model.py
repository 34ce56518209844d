"""The multi-label head as one Spark stage: ``FindingsHeadModel`` scores a ``findings`` ``HeadArrays`` on features.

A multi-label run's Spark model is ``PipelineModel([ImageFeaturizer, FindingsHeadModel])``: the head is the
exported arrays (one binary part per finding, or the masked-BCE network), scored with NumPy in a pandas UDF, so
``imgfeat predict``, the pyfunc model and ``train``'s own evaluation score with the very same numbers. Output
columns: ``finding_probability`` (array<double>, P(finding) in ``findings`` order) and ``finding_prediction``
(array<string>: the findings at or above their thresholds, in ``findings`` order). The stage's params carry the
findings, the thresholds and the aggregation (``getFindings``, ``getThresholds``, ``getAggregation``).
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pyspark import keyword_only
from pyspark.ml import Model
from pyspark.ml.param.shared import HasFeaturesCol, HasPredictionCol, HasProbabilityCol, Param, Params, TypeConverters
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable

from imgfeat.scoring.heads import HeadArrays

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

PROBABILITY_COL = "finding_probability"
PREDICTION_COL = "finding_prediction"


def arrays_to_b64(head: HeadArrays) -> tuple[str, str]:
    """(JSON description, base64 .npz of the arrays) of a head: numbers only, loaded without pickle."""
    description, arrays = head.flat()
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return json.dumps(description, sort_keys=True), base64.b64encode(buf.getvalue()).decode("ascii")


def arrays_from_b64(description: str, data: str) -> HeadArrays:
    with np.load(io.BytesIO(base64.b64decode(data)), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return HeadArrays.from_flat(json.loads(description), arrays)


class FindingsHeadModel(Model, HasFeaturesCol, HasPredictionCol, HasProbabilityCol, DefaultParamsReadable,
                        DefaultParamsWritable):
    """features (vector) -> finding_probability (array<double>) and finding_prediction (array<string>)."""

    findings = Param(Params._dummy(), "findings", "the findings, in the order of the probabilities",
                     TypeConverters.toListString)
    thresholds = Param(Params._dummy(), "thresholds", "each finding's decision threshold", TypeConverters.toListFloat)
    aggregation = Param(Params._dummy(), "aggregation", "mean | max | noisy_or (a study's images), or empty",
                        TypeConverters.toString)
    headDescription = Param(Params._dummy(), "headDescription", "the head's JSON description", TypeConverters.toString)
    headArraysB64 = Param(Params._dummy(), "headArraysB64", "the head's arrays, base64 .npz", TypeConverters.toString)

    @keyword_only
    def __init__(self, featuresCol: str = "features", predictionCol: str = PREDICTION_COL,
                 probabilityCol: str = PROBABILITY_COL, findings: list[str] | None = None,
                 thresholds: list[float] | None = None, aggregation: str = "", headDescription: str = "",
                 headArraysB64: str = "") -> None:
        super().__init__()
        self._setDefault(featuresCol="features", predictionCol=PREDICTION_COL, probabilityCol=PROBABILITY_COL,
                         findings=[], thresholds=[], aggregation="", headDescription="", headArraysB64="")
        self._set(**self._input_kwargs)

    @classmethod
    def of(cls, head: HeadArrays, thresholds: list[float] | None = None, aggregation: str | None = None,
           featuresCol: str = "features") -> FindingsHeadModel:
        """The stage for a ``findings`` head (thresholds default to 0.5)."""
        names = head.findings
        description, data = arrays_to_b64(head)
        return cls(featuresCol=featuresCol, findings=names,
                   thresholds=list(thresholds) if thresholds is not None else [0.5] * len(names),
                   aggregation=aggregation or "", headDescription=description, headArraysB64=data)

    def getFindings(self) -> list[str]:
        return list(self.getOrDefault("findings"))

    def getThresholds(self) -> list[float]:
        return list(self.getOrDefault("thresholds"))

    def getAggregation(self) -> str | None:
        return self.getOrDefault("aggregation") or None

    def head(self) -> HeadArrays:
        return arrays_from_b64(self.getOrDefault("headDescription"), self.getOrDefault("headArraysB64"))

    def _transform(self, dataset: DataFrame) -> DataFrame:
        from pyspark.ml.functions import vector_to_array
        from pyspark.sql import functions as F
        from pyspark.sql.functions import pandas_udf

        description, data = self.getOrDefault("headDescription"), self.getOrDefault("headArraysB64")

        @pandas_udf("array<double>")
        def score(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
            head = arrays_from_b64(description, data)
            for batch in batches:
                out: list[Any] = [None] * len(batch)
                ok = [i for i, v in enumerate(batch) if v is not None]
                if ok:
                    x = np.stack([np.asarray(batch.iloc[i], dtype=np.float64) for i in ok])
                    with np.errstate(invalid="ignore", over="ignore"):
                        proba = head.finding_probabilities(x)
                    for j, i in enumerate(ok):
                        out[i] = proba[j].tolist()
                yield pd.Series(out)

        prob = self.getProbabilityCol()
        result = dataset.withColumn(prob, score(vector_to_array(F.col(self.getFeaturesCol()))))
        called = [F.when(F.col(prob)[j] >= F.lit(float(t)), F.lit(name))
                  for j, (name, t) in enumerate(zip(self.getFindings(), self.getThresholds(), strict=True))]
        prediction = F.array_compact(F.array(*called)) if called else F.array().cast("array<string>")
        return result.withColumn(self.getPredictionCol(), F.when(F.col(prob).isNotNull(), prediction))
