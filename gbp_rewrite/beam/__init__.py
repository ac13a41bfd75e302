"""Explain a dataset with Apache Beam: the `explain` command as a pipeline (the `beam` extra).

    import apache_beam as beam
    from gbp_rewrite.beam import ExplainImages

    with beam.Pipeline() as p:
        p | beam.Create(["gs://bucket/photos/*.jpg"]) | ExplainImages("gs://bucket/model", out="gs://bucket/out")

Decoding, preprocessing, the model call and the pictures are `explain`'s own functions, so the
pictures and numbers are those of `gbp-rewrite explain` (bit for bit at the same batch
composition; see ExplainImages). Needs apache-beam: `pip install -e '.[beam]'`.
"""

from gbp_rewrite.beam.extra import require_beam

require_beam()

from gbp_rewrite.beam.handler import ExplainableModelHandler
from gbp_rewrite.beam.run import PipelineSummary, run_explain
from gbp_rewrite.beam.transform import ExplainImages

__all__ = ["ExplainImages", "ExplainableModelHandler", "PipelineSummary", "run_explain"]
