"""Publishing a trained DECD model to the Hugging Face Hub: weights, processor, code, handler and model card.

`publish` uploads an inference model: weights (safetensors, decoder detached by default), config with
`auto_map`, the custom-code files (`CODE_FILES`), the processor (tokenizer + image processor), the Inference
Endpoints `handler.py`, an example person crop for the widget and, last, the card (`decd.hub.card`).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi

from .card import EXAMPLE_IMAGE_FILE, HANDLER_FILE, build_model_card
from .results import check_results, results_from_training_output

logger = logging.getLogger(__name__)

# The flat modules that travel to the Hub as the model's custom code (setup.cfg's py_modules list them too).
CODE_FILES = ("configuration_decd.py", "modeling_decd.py", "losses_decd.py", "processing_decd.py",
              "image_loading_decd.py", "tokenization_decd.py", "captions_decd.py", "inference_decd.py")


def _repo_root() -> Path:
    """The checkout (or Space folder) holding handler.py and app.py next to the `decd` package."""
    return Path(__file__).resolve().parents[2]


def _hyperparameters_from(model, processor, folder: Path | None) -> dict:
    config = model.config
    settings = {
        "image_size (height, width)": tuple(config.image_size),
        "projection_dim": config.projection_dim,
        "temperature": round(float(model.temperature), 6),  # the weights' (a learnable one starts at the config's)
    }
    state_file = folder / "trainer_state.json" if folder is not None else None
    trained_here = state_file is not None and state_file.is_file()
    if getattr(config, "conversion", None) and not trained_here:
        return settings  # weights trained elsewhere: DECD's loss settings would claim a training that never ran
    settings.update({
        "image-text loss": config.similarity_loss,
        "mask_probability (MCM)": processor.mask_probability,
        "quality_reference_words": processor.quality_reference_words,
        "loss weights (sew / mcm / id)": f"{config.sew_weight} / {config.mcm_weight} / {config.id_weight}",
        "decoder": f"{config.decoder_layers} layers, width {config.decoder_hidden_size} (training only)",
    })
    if trained_here:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        for key in ("train_batch_size", "num_train_epochs", "max_steps", "global_step", "best_metric",
                    "best_model_checkpoint"):
            if state.get(key) is not None:
                settings[key] = state[key]
    return settings


def _example_crop(image_size: tuple[int, int]) -> bytes:
    """A generated person crop (PNG) for the widget and the usage snippet: no real person is shown."""
    import numpy as np

    from ..synthetic import render_person, sample_identities

    attributes = sample_identities(1, seed=0)[0]
    image = render_person(attributes, np.random.default_rng(0), image_size=tuple(image_size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _load_for_publishing(model_or_folder, processor, keep_decoder):
    from inference_decd import load_model
    from processing_decd import DecdProcessor

    folder = None
    if isinstance(model_or_folder, (str, os.PathLike)):
        folder = Path(model_or_folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} has no config.json: pass a folder written by save_pretrained.")
        model, saved_processor = load_model(folder, device="cpu")
        processor = processor or saved_processor
        if not keep_decoder:
            model.detach_decoder()  # our own copy: nothing of the caller's changes
    else:
        model = model_or_folder
        if not keep_decoder and getattr(model, "decoder", None) is not None:
            # Detach on a copy: the caller may keep training its model (costs one model's memory).
            model = copy.deepcopy(model).detach_decoder()
        if processor is None:
            processor = DecdProcessor(image_size=model.config.image_size)
    if keep_decoder and getattr(model, "decoder", None) is None:
        logger.warning("keep_decoder=True but this model has no decoder (it was detached before saving).")
    return model.eval(), processor, folder


def publish(
    model_or_folder,
    repo_id: str,
    processor=None,
    results: Sequence[Mapping] | None = None,
    keep_decoder: bool = False,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload DECD model",
    dataset_name: str | None = None,
    **card_kwargs,
) -> str:
    """Push a DECD model, its processor, remote code, the endpoint handler and a model card to the Hub.

    Args:
        model_or_folder: a `DecdModel`, or a folder written by `save_pretrained` / `examples/train.py`.
        repo_id: "namespace/name" (created if missing).
        processor: the `DecdProcessor`; default: loaded from the folder, or a default one sized for the model.
        results: measured results for the card (see `build_model_card`). When None and the folder holds
            `all_results.json` (from `examples/train.py`), its test metrics are used, labelled with
            `dataset_name` (required then: the file does not say which dataset it measured).
        keep_decoder: upload the training-only decoder too (a training checkpoint). By default the
            decoder is detached from a *copy* of a given model (or from the freshly loaded one): the
            caller's model is never modified.
        private: create the repository as private (ignored when it exists).
        token: Hub token (default: the logged-in one / `HF_TOKEN`).
        commit_message: message of the model commit; the other commits say what they add.
        **card_kwargs: passed to `build_model_card` (base_model, datasets, training_hyperparameters,
            license, widget_images, conversion). `base_model` defaults to `model.config.base_model`, and
            `conversion` to the record `decd-convert` leaves in the config.

    Returns:
        The repository URL.

    Order matters: `push_to_hub` of the model and of the processor each rewrite `README.md` with a
    generic card, so the real card is pushed last.
    """
    model, processor, folder = _load_for_publishing(model_or_folder, processor, keep_decoder)
    if results is None and folder is not None and (folder / "all_results.json").is_file():
        if dataset_name is None:
            raise ValueError(f"{folder / 'all_results.json'} does not name its dataset: pass dataset_name="
                             "'cuhk-pedes' | 'icfg-pedes' | 'rstpreid' | 'synthetic' to label its results.")
        results = results_from_training_output(folder, dataset_name)
    results = check_results(results or [])

    api = HfApi(token=token)  # built now so that it uses the current endpoint (HF_ENDPOINT)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    repo_id = repo_url.repo_id

    model.push_to_hub(repo_id, commit_message=commit_message, token=token, private=private)
    processor.push_to_hub(repo_id, commit_message="Upload DECD processor", token=token, private=private)

    extra = [CommitOperationAdd(path_in_repo=EXAMPLE_IMAGE_FILE,
                                path_or_fileobj=_example_crop(model.config.image_size))]
    # transformers copies the custom code on save_pretrained; upload whatever did not arrive.
    present = set(api.list_repo_files(repo_id))
    code_folder = Path(sys.modules[type(model).__module__].__file__).parent
    for name in CODE_FILES:
        if name not in present:
            logger.warning("%s was not uploaded by push_to_hub; uploading it from %s.", name, code_folder)
            extra.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(code_folder / name)))
    handler = _repo_root() / HANDLER_FILE
    if handler.is_file():
        extra.append(CommitOperationAdd(path_in_repo=HANDLER_FILE, path_or_fileobj=str(handler)))
    else:
        logger.warning("No %s next to the decd package: the repository gets no Inference Endpoints handler.",
                       HANDLER_FILE)
    api.create_commit(repo_id, operations=extra, commit_message="Add Inference Endpoints handler and example image")

    card_kwargs.setdefault("base_model", getattr(model.config, "base_model", None) or None)
    card_kwargs.setdefault("conversion", getattr(model.config, "conversion", None) or None)  # a decd-convert folder
    card_kwargs.setdefault("training_hyperparameters", _hyperparameters_from(model, processor, folder))
    card_kwargs.setdefault("widget_images", [f"{api.endpoint}/{repo_id}/resolve/main/{EXAMPLE_IMAGE_FILE}"])
    card = build_model_card(repo_id, results, **card_kwargs)
    api.upload_file(path_or_fileobj=str(card).encode("utf-8"), path_in_repo="README.md", repo_id=repo_id,
                    commit_message="Add model card")
    return str(repo_url)


__all__ = ["CODE_FILES", "publish"]
