"""DECD: text-based person search with a CLIP dual encoder trained through a detachable cross-modal decoder.

The model and everything that travels with it to the Hugging Face Hub as custom code live in flat top-level
modules (`configuration_decd`, `modeling_decd`, `losses_decd`, `processing_decd`, `image_loading_decd`,
`tokenization_decd`, `captions_decd`, `inference_decd`); the functions every entry point stands on
(`load_image`, `load_model`, `embed_images`, `embed_texts`) are re-exported here. This package holds
everything around them: datasets, training, evaluation, search, publishing and pictures. Importing `decd`
registers the model with the Auto classes and the "text-based-person-search" pipeline.
"""

from configuration_decd import DecdConfig
from captions_decd import compute_caption_quality
from image_loading_decd import load_image
from inference_decd import ModelLoadError, embed_images, embed_texts, load_model
from losses_decd import sew_loss
from modeling_decd import DecdModel, DecdOutput
from processing_decd import DecdProcessor

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
