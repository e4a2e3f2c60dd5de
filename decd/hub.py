"""Publishing a trained DECD model to the Hugging Face Hub: model card and upload.

`build_model_card` writes the card: Hub metadata (`model-index` with the measured retrieval metrics,
a zero-shot widget, tags, license) and a body that keeps measured numbers and the published numbers
of the paper and of related work in separate, labelled tables.

`publish` uploads an inference model: weights (safetensors, decoder detached by default), config with
`auto_map`, the three custom-code files, the processor (tokenizer + image processor), the Inference
Endpoints `handler.py`, an example person crop for the widget and, last, the card.

Task id of the evaluation results: the Hub has no task id for text-to-image retrieval
("text-to-image" means image *generation*), so `model-index` entries use
`zero-shot-image-classification` -- the pipeline this model serves (ranking text descriptions for a
person crop) and the card's `pipeline_tag` -- with the task *name* "Text-based person retrieval
(text -> image)" saying what was measured.
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
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData

logger = logging.getLogger(__name__)

PAPER_ARXIV_ID = "2304.02278"
PAPER_URL = f"https://arxiv.org/abs/{PAPER_ARXIV_ID}"
TASK_TYPE = "zero-shot-image-classification"
TASK_NAME = "Text-based person retrieval (text -> image)"
METRIC_NAMES = ("R1", "R5", "R10", "mAP", "mINP")
# Metric ids in model-index and display names (all values in percent).
METRIC_TYPES = {"R1": "recall@1", "R5": "recall@5", "R10": "recall@10", "mAP": "mAP", "mINP": "mINP"}
METRIC_DISPLAY = {"R1": "R@1", "R5": "R@5", "R10": "R@10", "mAP": "mAP", "mINP": "mINP"}
DEFAULT_TAGS = ("text-based-person-search", "person-retrieval", "text-to-image-retrieval", "clip", "decd",
                "dual-encoder", "custom_code")
CODE_FILES = ("configuration_decd.py", "modeling_decd.py", "processing_decd.py")
HANDLER_FILE = "handler.py"
EXAMPLE_IMAGE_FILE = "example_person.png"

# Dataset names as accepted by `decd.data.load_person_search` -> (display name, model-index dataset type).
DATASETS = {
    "cuhk-pedes": ("CUHK-PEDES", "cuhk-pedes"),
    "icfg-pedes": ("ICFG-PEDES", "icfg-pedes"),
    "rstpreid": ("RSTPReid", "rstpreid"),
    "synthetic": ("DECD synthetic person search (generated)", "decd-synthetic"),
}

# Published numbers (percent), copied from the project's protocol notes; NOT measured by this code.
# R@1 / R@5 / R@10 / mAP / mINP; None where a paper does not report the metric.
PUBLISHED_RESULTS = {
    "DECD / SCMM paper (R@1 only)": {
        "CUHK-PEDES": (73.81, None, None, None, None),
        "ICFG-PEDES": (64.25, None, None, None, None),
        "RSTPReid": (57.35, None, None, None, None),
    },
    "IRRA (CVPR23)": {
        "CUHK-PEDES": (73.38, 89.93, 93.71, 66.13, 50.24),
        "ICFG-PEDES": (63.46, 80.24, 85.82, 38.05, 7.92),
        "RSTPReid": (60.20, 81.30, 88.20, 47.17, 25.28),
    },
    "RDE (CVPR24)": {
        "CUHK-PEDES": (75.94, 90.14, 94.12, 67.56, 51.44),
        "ICFG-PEDES": (67.68, 82.47, 87.36, 40.06, 7.87),
        "RSTPReid": (65.35, 83.95, 89.90, 50.88, 28.08),
    },
    "RaSa (IJCAI23, cross-encoder re-rank)": {
        "CUHK-PEDES": (76.51, 90.29, 94.25, 69.38, None),
        "ICFG-PEDES": (65.28, 80.40, 85.12, 41.29, None),
        "RSTPReid": (66.90, 86.50, 91.35, 52.31, None),
    },
    "ICL (CVPR25, no extra data)": {
        "CUHK-PEDES": (76.41, 90.48, 94.33, 68.04, 51.99),
        "ICFG-PEDES": (68.11, 82.59, 87.52, 40.81, 8.18),
        "RSTPReid": (67.70, 86.05, 91.75, 52.62, 29.36),
    },
}

DEFAULT_WIDGET_LABELS = (
    "a woman in a red coat with a black backpack",
    "a man in a blue shirt and grey trousers",
    "a person in a white dress",
)

CITATION = """@article{decd2023,
  title   = {Text-based Person Search with a Detachable Cross-modal Decoder},
  journal = {arXiv preprint arXiv:2304.02278},
  year    = {2023},
  url     = {https://arxiv.org/abs/2304.02278}
}"""


# ----------------------------------------------------------------------------------------------------
# Saved folders
# ----------------------------------------------------------------------------------------------------
def saved_model_type(folder: str | os.PathLike) -> str | None:
    """The `model_type` in `folder/config.json` (e.g. "decd", "clip"), or None when `folder` has no config.json.

    Lets scripts tell a saved DECD model from a CLIP checkpoint or a Hub id before loading anything.
    Raises ValueError naming the file when config.json cannot be read or is not a JSON object.
    """
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {config_file}: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} is not a JSON object")
    return config.get("model_type")


# ----------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------
def dataset_labels(dataset_name: str) -> tuple[str, str]:
    """(display name, model-index dataset type) of a dataset name such as "cuhk-pedes" or "synthetic"."""
    key = dataset_name.lower()
    return DATASETS.get(key, (dataset_name, key))


def results_from_training_output(folder: str | os.PathLike, dataset_name: str, split: str = "test") -> list[dict]:
    """Read `all_results.json` written by `examples/train.py` into the `results` list of `build_model_card`.

    Uses the keys `{split}_R1`, `{split}_R5`, `{split}_R10`, `{split}_mAP`, `{split}_mINP` (percent) and
    `{split}_selected_on` (the model-selection split). Raises `FileNotFoundError` / `ValueError` when the
    file or a metric is missing.
    """
    path = Path(folder) / "all_results.json"
    metrics = json.loads(path.read_text(encoding="utf-8"))
    missing = [f"{split}_{name}" for name in METRIC_NAMES if f"{split}_{name}" not in metrics]
    if missing:
        raise ValueError(f"{path} lacks {missing}: was the model evaluated on the {split} split?")
    display_name, dataset_type = dataset_labels(dataset_name)
    return [{
        "dataset_name": display_name,
        "dataset_type": dataset_type,
        "split": split,
        "metrics": {name: float(metrics[f"{split}_{name}"]) for name in METRIC_NAMES},
        "selected_on": metrics.get(f"{split}_selected_on"),
    }]


def _check_results(results: Sequence[Mapping]) -> list[dict]:
    checked = []
    for index, result in enumerate(results or []):
        for key in ("dataset_name", "dataset_type", "split", "metrics"):
            if key not in result:
                raise ValueError(f"results[{index}] lacks {key!r}: expected dataset_name, dataset_type, split, "
                                 "metrics (and optionally selected_on).")
        unknown = set(result["metrics"]) - set(METRIC_NAMES)
        if unknown:
            raise ValueError(f"results[{index}] has unknown metrics {sorted(unknown)}; known: {list(METRIC_NAMES)}.")
        checked.append(dict(result))
    return checked


def _eval_results(results: list[dict]) -> list[EvalResult]:
    evals = []
    for result in results:
        dataset_args = {"model_selection_split": result["selected_on"]} if result.get("selected_on") else None
        for name, value in result["metrics"].items():
            evals.append(EvalResult(
                task_type=TASK_TYPE,
                task_name=TASK_NAME,
                dataset_type=result["dataset_type"],
                dataset_name=result["dataset_name"],
                dataset_split=result["split"],
                dataset_args=dataset_args,
                metric_type=METRIC_TYPES[name],
                metric_name=f"{METRIC_DISPLAY[name]} (%)",
                metric_value=float(value),
            ))
    return evals


# ----------------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------------
def _format(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _measured_table(results: list[dict]) -> str:
    if not results:
        return "_No evaluation results were given when this card was written._\n"
    header = "| dataset | split | model selected on | " + " | ".join(METRIC_DISPLAY[m] for m in METRIC_NAMES) + " |"
    lines = [header, "|" + "---|" * (3 + len(METRIC_NAMES))]
    for result in results:
        selected = result.get("selected_on") or "not recorded"
        values = " | ".join(_format(result["metrics"].get(name)) for name in METRIC_NAMES)
        lines.append(f"| {result['dataset_name']} | {result['split']} | {selected} | {values} |")
    return "\n".join(lines) + "\n"


def _published_table() -> str:
    datasets = ("CUHK-PEDES", "ICFG-PEDES", "RSTPReid")
    lines = ["| method | " + " | ".join(datasets) + " |", "|---|---|---|---|"]
    for method, by_dataset in PUBLISHED_RESULTS.items():
        cells = []
        for dataset in datasets:
            values = by_dataset[dataset]
            shown = [v for v in values if v is not None]
            cells.append(" / ".join(_format(v) for v in values) if len(shown) > 1 else _format(values[0]))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _hyperparameter_table(hyperparameters: Mapping[str, Any] | None) -> str:
    if not hyperparameters:
        return "_Not recorded._\n"
    lines = ["| setting | value |", "|---|---|"]
    for key, value in hyperparameters.items():
        lines.append(f"| `{key}` | {value} |")
    return "\n".join(lines) + "\n"


def _usage(repo_id: str) -> str:
    return f'''```python
import torch
from huggingface_hub import hf_hub_download
from PIL import Image
from transformers import AutoModel, AutoProcessor

repo_id = "{repo_id}"
model = AutoModel.from_pretrained(repo_id, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(repo_id, trust_remote_code=True)

captions = ["a woman in a red coat with a black backpack", "a man in a blue shirt and grey trousers"]
image = Image.open(hf_hub_download(repo_id, "{EXAMPLE_IMAGE_FILE}"))  # any person crop works
with torch.no_grad():  # the same calls as with transformers' CLIPModel
    text_embeds = model.get_text_features(**processor(text=captions, return_tensors="pt")).pooler_output
    image_embeds = model.get_image_features(**processor(images=[image], return_tensors="pt")).pooler_output
text_embeds = torch.nn.functional.normalize(text_embeds, dim=-1)
image_embeds = torch.nn.functional.normalize(image_embeds, dim=-1)
cosine = text_embeds @ image_embeds.T  # [captions, images]; rank a gallery per caption by this
print(cosine)
```

Or rank descriptions for one person crop with the zero-shot pipeline (softmax over the candidates):

```python
from transformers import pipeline

classifier = pipeline("zero-shot-image-classification", model=repo_id, trust_remote_code=True)
print(classifier(image, candidate_labels=captions, hypothesis_template="{{}}"))
```
'''


def build_model_card(
    repo_id: str,
    results: Sequence[Mapping] | None,
    base_model: str | None = None,
    datasets: Sequence[str] | None = None,
    training_hyperparameters: Mapping[str, Any] | None = None,
    license: str = "apache-2.0",
    widget_images: Sequence[str | Mapping] | None = None,
) -> ModelCard:
    """The model card (Hub metadata + markdown body) of a DECD model.

    Args:
        repo_id: the Hub repository, used in the usage snippet and the default widget image URL.
        results: measured results, one dict per dataset/split: ``{"dataset_name", "dataset_type",
            "split", "metrics": {"R1", "R5", "R10", "mAP", "mINP"} (percent), "selected_on"}``.
            Each metric becomes one `EvalResult` of the card's `model-index`, with the exact value given.
        base_model: the CLIP checkpoint training started from, if any.
        datasets: dataset ids for the metadata; default: the `dataset_type` of each result.
        training_hyperparameters: shown as a table in the body.
        license: license id of the weights.
        widget_images: widget examples: image URLs, or dicts ``{"src", "candidate_labels" (list or
            comma-separated str), "example_title"}``. Default: the example crop `publish` uploads.
    """
    results = _check_results(results or [])
    if datasets is None:
        datasets = list(dict.fromkeys(result["dataset_type"] for result in results)) or None
    widget = []
    default_image = f"https://huggingface.co/{repo_id}/resolve/main/{EXAMPLE_IMAGE_FILE}"
    for index, example in enumerate(widget_images or [default_image]):
        example = {"src": example} if isinstance(example, str) else dict(example)
        labels = example.get("candidate_labels", DEFAULT_WIDGET_LABELS)
        if not isinstance(labels, str):  # the widget reads one comma-separated string
            labels = ", ".join(label.replace(",", " ") for label in labels)
        widget.append({"src": example["src"], "candidate_labels": labels,
                       "example_title": example.get("example_title", f"Person crop {index + 1}")})
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        base_model=base_model,
        datasets=list(datasets) if datasets else None,
        license=license,
        tags=list(DEFAULT_TAGS),
        model_name=repo_id.split("/")[-1],
        eval_results=_eval_results(results) or None,
        widget=widget,
    )
    base = f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model else "random initialisation"
    body = f"""
# {repo_id.split("/")[-1]}: DECD for text-based person search

A CLIP-style **dual encoder** that retrieves pedestrian images from a free-text description
(text-based person search), trained with the recipe of *DECD* ([arXiv:{PAPER_ARXIV_ID}]({PAPER_URL})):
a similarity-distribution loss with caption-quality-adaptive margins (Sew) and a **detachable
cross-modal decoder** trained with masked caption modeling (MCM). The decoder exists only during
training; this repository holds the dual encoder (`get_text_features`, `get_image_features`), so
inference costs exactly what a CLIP model of the same size costs. Started from: {base}.

Images are person crops, resized (not cropped) to the processor's `image_size` (height, width; see
`processor_config.json`); captions are tokenised with CLIP's BPE (77 tokens, longer ones truncated).

## Results measured for this model

Measured by this repository's evaluation code (text -> image retrieval, cosine similarity, no
re-ranking; percent). "Model selected on" is the split used to pick the checkpoint; the numbers are
on "split".

{_measured_table(results)}
## Published reference numbers (not measured here)

Reported in the respective papers on the standard test splits (R@1 / R@5 / R@10 / mAP / mINP, percent;
"-" = not reported). They are **not** results of this model, and most prior work selects checkpoints
on the test split. Compare only with measured numbers on the same dataset and split.

{_published_table()}
## Training hyperparameters

{_hyperparameter_table(training_hyperparameters)}
## How to use

The modeling code ships in this repository, so loading needs `trust_remote_code=True`
(transformers >= 5).

{_usage(repo_id)}
An Inference Endpoints handler (`{HANDLER_FILE}`) is included: send
`{{"inputs": {{"text": [...], "image": "<base64>" or [...]}}, "parameters": {{"mode": "text-to-image"}}}}`
(or `"image-to-text"`) and get cosine similarities and softmax probabilities, best first.

## Intended use and limitations

- **Intended use**: research on text-based person retrieval and benchmarking, e.g. searching a
  consented, lawfully collected image collection by description.
- **Surveillance data and bias**: the public benchmarks (CUHK-PEDES, ICFG-PEDES, RSTPReid) are
  cropped from surveillance footage with crowd-sourced captions. They over-represent some places,
  seasons, clothing styles and demographics, and captions carry annotators' biases (gender words,
  colour naming). Expect uneven accuracy across groups and domains; evaluate on your own data first.
- **Privacy and misuse**: retrieving people by appearance can be used to track or identify
  individuals without consent. Do not use this model for covert surveillance, tracking of
  individuals, or identification of people in public spaces; follow the law that applies to you
  (e.g. GDPR, the EU AI Act's limits on remote biometric identification).
- **Not an identity verifier**: scores rank candidates; they are not calibrated probabilities that two
  images show the same person.
- **Synthetic-data models are demos only**: a model trained on the generated synthetic benchmark only
  shows that the pipeline works; it has not seen real people and its numbers say nothing about real
  data.

## Citation

```bibtex
{CITATION}
```
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


# ----------------------------------------------------------------------------------------------------
# Publishing
# ----------------------------------------------------------------------------------------------------
def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def _hyperparameters_from(model, processor, folder: Path | None) -> dict:
    config = model.config
    settings = {
        "image_size (height, width)": tuple(config.image_size),
        "projection_dim": config.projection_dim,
        "temperature": config.temperature,
        "sew_margin (m_max)": config.sew_margin,
        "caption_quality": config.caption_quality,
        "mask_probability (MCM)": processor.mask_probability,
        "quality_reference_words": processor.quality_reference_words,
        "loss weights (sew / mcm / id)": f"{config.sew_weight} / {config.mcm_weight} / {config.id_weight}",
        "decoder": f"{config.decoder_layers} layers, width {config.decoder_hidden_size} (training only)",
    }
    state_file = folder / "trainer_state.json" if folder is not None else None
    if state_file is not None and state_file.is_file():
        state = json.loads(state_file.read_text(encoding="utf-8"))
        for key in ("train_batch_size", "num_train_epochs", "max_steps", "global_step", "best_metric",
                    "best_model_checkpoint"):
            if state.get(key) is not None:
                settings[key] = state[key]
    return settings


def _example_crop(image_size: tuple[int, int]) -> bytes:
    """A generated person crop (PNG) for the widget and the usage snippet: no real person is shown."""
    import numpy as np

    from .synthetic import render_person, sample_identities

    attributes = sample_identities(1, seed=0)[0]
    image = render_person(attributes, np.random.default_rng(0), image_size=tuple(image_size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _load_for_publishing(model_or_folder, processor, keep_decoder):
    from modeling_decd import load_model
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
            license, widget_images). `base_model` defaults to `model.config.base_model`.

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
    results = _check_results(results or [])

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
    card_kwargs.setdefault("training_hyperparameters", _hyperparameters_from(model, processor, folder))
    card_kwargs.setdefault("widget_images", [f"{api.endpoint}/{repo_id}/resolve/main/{EXAMPLE_IMAGE_FILE}"])
    card = build_model_card(repo_id, results, **card_kwargs)
    api.upload_file(path_or_fileobj=str(card).encode("utf-8"), path_in_repo="README.md", repo_id=repo_id,
                    commit_message="Add model card")
    return str(repo_url)


# --------------------------------------------------------------------------------------------
# The demo as a Hugging Face Space
# --------------------------------------------------------------------------------------------

SPACE_APP_FILES = ("app.py", "configuration_decd.py", "modeling_decd.py", "processing_decd.py")
SPACE_CONFIG_FILE = "space_config.json"  # read by app.py: the model id and gallery folder to use
SPACE_GALLERY_FOLDER = "gallery"
DEFAULT_GRADIO_VERSION = "6.31.0"


def _gradio_version() -> str:
    try:
        from importlib.metadata import version

        return version("gradio")
    except Exception:  # gradio not installed here: the version the app was tested with
        return DEFAULT_GRADIO_VERSION


def build_space_readme(space_id: str, model_id: str, gallery_note: str, title: str = "DECD person search",
                       sdk_version: str | None = None) -> str:
    """The Space's README.md: the metadata header Spaces read (sdk, sdk_version, app_file, ...) and a short body."""
    header = {
        "title": title,
        "emoji": "🚶",
        "colorFrom": "blue",
        "colorTo": "green",
        "sdk": "gradio",
        "sdk_version": sdk_version or _gradio_version(),
        "python_version": "3.11",
        "app_file": "app.py",
        "pinned": False,
        "license": "apache-2.0",
        "models": [model_id] if "/" in model_id and not os.path.isabs(model_id) else [],
        "tags": ["text-based-person-search", "person-retrieval", "re-identification", "clip", "decd"],
        "short_description": "Find a person in a gallery of crops by description or photo",
    }
    import yaml

    return (f"---\n{yaml.safe_dump(header, sort_keys=False, allow_unicode=True)}---\n\n# {title}\n\n"
            f"Text-based person search with [DECD]({PAPER_URL}) (a CLIP dual encoder): describe a pedestrian "
            f"and press Enter, or drop a photo of the person, and the gallery is ranked by cosine similarity.\n\n"
            f"- Model: `{model_id}`\n- Gallery: {gallery_note}\n\n"
            f"Published with `python scripts/push_space.py --space {space_id} --model {model_id}` "
            f"(`decd.hub.publish_space`). The model and gallery are set in `{SPACE_CONFIG_FILE}`; the "
            f"variables `DECD_MODEL` / `DECD_GALLERY` in the Space's settings override them.\n")


def stage_space(folder: str | os.PathLike, space_id: str, model_id: str, gallery: str | os.PathLike | None = None,
                title: str = "DECD person search", sdk_version: str | None = None) -> Path:
    """Write everything a Space needs into `folder`: app.py, the flat model modules, the `decd` package,
    requirements.txt (from requirements-app.txt), README.md with the Space header, `space_config.json`
    (model id, gallery) and, when `gallery` is a local folder (crops or an index), a copy of it under
    `gallery/`. Without `gallery` the Space searches the synthetic benchmark's test split (generated at
    start-up, offline)."""
    import shutil

    root, folder = _repo_root(), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in SPACE_APP_FILES:
        shutil.copy2(root / name, folder / name)
    shutil.copytree(root / "decd", folder / "decd", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    requirements = (root / "requirements-app.txt").read_text()
    (folder / "requirements.txt").write_text(requirements + "matplotlib>=3.7\n")
    config = {"model": str(model_id)}
    if gallery is not None and Path(gallery).is_dir():
        shutil.copytree(gallery, folder / SPACE_GALLERY_FOLDER, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("partial"))
        config["gallery"] = SPACE_GALLERY_FOLDER
        gallery_note = f"the {sum(1 for _ in (folder / SPACE_GALLERY_FOLDER).rglob('*') if _.is_file())} files of " \
                       f"`{SPACE_GALLERY_FOLDER}/` (copied from {Path(gallery).name})"
    elif gallery is not None:  # a path on the Space's machine (e.g. persistent storage /data/crops)
        config["gallery"] = str(gallery)
        gallery_note = f"`{gallery}` on the Space's machine"
    else:
        gallery_note = ("the synthetic benchmark's test split (400 generated crops of 100 people, made at start-up; "
                        "examples are its captions)")
    (folder / SPACE_CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    (folder / "README.md").write_text(build_space_readme(space_id, str(model_id), gallery_note, title, sdk_version))
    return folder


def publish_space(space_id: str, model_id: str, gallery: str | os.PathLike | None = None, private: bool = False,
                  token: str | None = None, title: str = "DECD person search",
                  commit_message: str = "Upload DECD person-search demo") -> str:
    """Create (or update) a Gradio Space running app.py with `model_id` (a Hub id) and `gallery`; returns its URL.

    One commit: `stage_space`'s folder, uploaded with `HfApi.upload_folder` after
    `HfApi.create_repo(repo_type="space", space_sdk="gradio", exist_ok=True)`.
    """
    import tempfile

    api = HfApi(token=token)  # built now so that it uses the current endpoint (HF_ENDPOINT)
    repo_url = api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="decd-space-") as folder:
        stage_space(folder, repo_url.repo_id, model_id, gallery, title)
        api.upload_folder(folder_path=folder, repo_id=repo_url.repo_id, repo_type="space",
                          commit_message=commit_message)
    return str(repo_url)


__all__ = [
    "PUBLISHED_RESULTS",
    "build_space_readme",
    "publish_space",
    "stage_space",
    "build_model_card",
    "dataset_labels",
    "publish",
    "results_from_training_output",
    "saved_model_type",
]
