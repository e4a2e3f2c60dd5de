"""DECD: text-based person search with a CLIP dual encoder trained through a detachable cross-modal decoder.

The model, config and processor live in the flat top-level modules `modeling_decd`, `configuration_decd`
and `processing_decd` (they double as the Hub repository's custom code); this package holds everything
around them: datasets, training, evaluation and visualisation. Importing `decd` registers the model
with the transformers Auto classes.
"""

from configuration_decd import DecdConfig
from modeling_decd import DecdModel, DecdOutput, sew_loss
from processing_decd import DecdProcessor, compute_caption_quality

from .data import LoadReport, PersonSearchDataError, load_person_search, num_identities
from .metrics import retrieval_metrics
from .retrieval import encode_gallery, encode_queries, evaluate_retrieval
from .synthetic import generate_synthetic_person_search
from .search import GalleryIndex
from . import pipeline as _pipeline  # noqa: F401  (registers the "text-based-person-search" pipeline task)

__version__ = "0.1.0"

__all__ = [
    "DecdConfig",
    "DecdModel",
    "DecdOutput",
    "DecdProcessor",
    "LoadReport",
    "PersonSearchDataError",
    "GalleryIndex",
    "compute_caption_quality",
    "encode_gallery",
    "encode_queries",
    "evaluate_retrieval",
    "generate_synthetic_person_search",
    "load_person_search",
    "num_identities",
    "retrieval_metrics",
    "sew_loss",
]
