"""DECD: text-based person search with a CLIP dual encoder trained through a detachable cross-modal decoder.

The model, config and processor live in the flat top-level modules `modeling_decd`, `configuration_decd`
and `processing_decd` (they double as the Hub repository's custom code), and so does the spine every
entry point stands on: `load_image` (processing_decd), `load_model`, `embed_images` and `embed_texts`
(modeling_decd), re-exported here. This package holds everything around them: datasets, training,
evaluation, search and visualisation. Importing `decd` registers the model with the Auto classes.
"""

from configuration_decd import DecdConfig
from modeling_decd import DecdModel, DecdOutput, ModelLoadError, embed_images, embed_texts, load_model, sew_loss
from processing_decd import DecdProcessor, compute_caption_quality, load_image

from .data import LoadReport, PersonSearchDataError, load_person_search, num_identities
from .metrics import retrieval_metrics
from .retrieval import evaluate_retrieval
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
    "ModelLoadError",
    "compute_caption_quality",
    "embed_images",
    "embed_texts",
    "evaluate_retrieval",
    "generate_synthetic_person_search",
    "load_image",
    "load_model",
    "load_person_search",
    "num_identities",
    "retrieval_metrics",
    "sew_loss",
]
