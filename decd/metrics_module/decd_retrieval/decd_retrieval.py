"""`evaluate` metric for text-to-image person retrieval: R@k, mAP and mINP.

Load it from its folder, offline:

    import evaluate
    retrieval = evaluate.load("path/to/decd/metrics_module/decd_retrieval")

This script is a thin adapter. The computation is `decd.metrics.retrieval_metrics`, imported from
the installed `decd` package (this folder ships inside it), so the numbers are those of the
package and of `docs/protocol.md`. `evaluate` copies the script alone into its module cache, so
the import cannot be relative; without `decd` installed, computing raises an ImportError that
says how to install it.
"""

import datasets
import evaluate
import numpy as np


_CITATION = """\
@misc{decd_retrieval,
  title = {Text-based person search retrieval metrics (R@k, mAP, mINP)},
  note = {mINP: Ye et al., Deep Learning for Person Re-identification: A Survey and Outlook, TPAMI 2021},
}
"""

_DESCRIPTION = """\
Retrieval metrics of text-based person search (text queries, image gallery). The gallery is ranked
per query by descending similarity, equal similarities ordered by gallery index (lower first).
R@k: percent of queries with a gallery item of their identity in the first k ranks. mAP: mean
average precision, in percent. mINP: mean inverse negative penalty, (number of relevant items) /
(1 + rank of the last relevant item), in percent. Queries whose identity has no gallery item are
left out of every metric and counted in `num_queries_without_match`.

Two configurations:
- "similarity" (also "default"): each prediction is one query's similarity row over the whole gallery.
- "embeddings": each prediction is one query's embedding; the gallery embeddings are passed to
  `compute`, and the similarity is the cosine of the L2-normalised embeddings.
evaluate caches every prediction row and hands them back as Python lists, so "similarity" suits
galleries of a few thousand items; for large ones (ICFG-PEDES: 19,848 x 19,848) use "embeddings",
which keeps [num_queries, dim] floats, or call `decd.metrics.retrieval_metrics` directly.
Rows are stored as float32, so float64 similarities that differ only beyond float32 become ties.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one row per query (float32). Configuration "similarity": the query's similarity
        to every gallery item, [num_gallery]. Configuration "embeddings": the query's embedding,
        [dim].
    references: the query's integer identity (person id).
    gallery_ids: [num_gallery] integer identities of the gallery items (required).
    gallery_embeddings: [num_gallery, dim] gallery embeddings (required by "embeddings", refused
        by "similarity").
    ks: cut-offs of the R@k values, default (1, 5, 10).
    chunk_size: queries processed at once, default automatic (about 256 MB working set).
Returns:
    R{k} for each k, mAP, mINP: floats in percent.
    num_queries (evaluated), num_queries_without_match (left out), num_gallery: ints.
Examples:
    >>> retrieval = evaluate.load("decd/metrics_module/decd_retrieval")
    >>> retrieval.compute(predictions=[[0.9, 0.1], [0.2, 0.8]], references=[7, 3], gallery_ids=[7, 3], ks=[1])
    {'R1': 100.0, 'mAP': 100.0, 'mINP': 100.0, 'num_queries': 2, 'num_queries_without_match': 0, 'num_gallery': 2}
"""

# "default" is what evaluate names the configuration when none is asked for.
_CONFIG_NAMES = ("default", "similarity", "embeddings")


def _retrieval_metrics():
    try:
        from decd.metrics import retrieval_metrics
    except ImportError as error:
        raise ImportError(
            "The decd_retrieval metric computes with the `decd` package, which is not importable here. "
            "Install the DECD repository it comes from (`pip install -e .` at the repository root)."
        ) from error
    return retrieval_metrics


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DecdRetrieval(evaluate.Metric):
    def _info(self):
        if self.config_name not in _CONFIG_NAMES:
            raise ValueError(f"Unknown configuration {self.config_name!r}; choose one of {list(_CONFIG_NAMES)}")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int64"),
                }
            ),
            # No `format`: evaluate allows one only for scalar features, so rows come back as lists.
        )

    def _compute(self, predictions, references, gallery_ids=None, gallery_embeddings=None, ks=(1, 5, 10), chunk_size=None):
        if gallery_ids is None:
            raise ValueError("decd_retrieval needs gallery_ids=[num_gallery] integer identities in compute()")
        lengths = {len(row) for row in predictions}
        if len(lengths) > 1:
            raise ValueError(f"every prediction row must have the same length, got lengths {sorted(lengths)[:5]}")
        rows = np.asarray(predictions, dtype=np.float32)
        if self.config_name == "embeddings":
            if gallery_embeddings is None:
                raise ValueError('the "embeddings" configuration needs gallery_embeddings=[num_gallery, dim] in compute()')
            similarity = _cosine_similarity(rows, gallery_embeddings)
        else:
            if gallery_embeddings is not None:
                raise ValueError(
                    'gallery_embeddings was given but predictions are similarity rows; load the metric with '
                    'config_name="embeddings" to pass query embeddings instead'
                )
            similarity = rows
        return _retrieval_metrics()(similarity, references, gallery_ids, ks=ks, chunk_size=chunk_size)


def _cosine_similarity(query_embeddings, gallery_embeddings):
    """[num_queries, num_gallery] cosine similarity of [num_queries, dim] and [num_gallery, dim]."""
    import torch

    queries = torch.as_tensor(np.asarray(query_embeddings, dtype=np.float32))
    gallery = torch.as_tensor(np.asarray(gallery_embeddings)).to(torch.float32)
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"query embeddings {tuple(queries.shape)} and gallery_embeddings {tuple(gallery.shape)} must be "
            "[num_queries, dim] and [num_gallery, dim] with the same dim"
        )
    queries = torch.nn.functional.normalize(queries, dim=1)
    gallery = torch.nn.functional.normalize(gallery, dim=1)
    return queries @ gallery.T
