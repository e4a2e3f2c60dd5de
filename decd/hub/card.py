"""The model card of a DECD model, for publishing (`decd.hub.publish`) and for converted checkpoints (`decd-convert`).

`build_model_card` writes Hub metadata (`model-index` with the measured retrieval metrics, a zero-shot
widget, tags, license) and a body that keeps measured numbers and the published numbers of the paper and
related work (`published_results.json`) in separate, labelled tables; for a converted checkpoint it adds
where the weights came from (file, format, sha256) and what the conversion changed and dropped.

Task id of the evaluation results: the Hub has no task id for text-to-image retrieval ("text-to-image"
means image *generation*), so `model-index` entries use `zero-shot-image-classification` -- the pipeline
this model serves (ranking text descriptions for a person crop) and the card's `pipeline_tag` -- with the
task *name* "Text-based person retrieval (text -> image)" saying what was measured.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .results import METRIC_DISPLAY, METRIC_NAMES, check_results, eval_results, format_value, published_table

PAPER_ARXIV_ID = "2304.02278"
PAPER_URL = f"https://arxiv.org/abs/{PAPER_ARXIV_ID}"
DEFAULT_TAGS = ("text-based-person-search", "person-retrieval", "text-to-image-retrieval", "clip", "decd",
                "dual-encoder", "custom_code")
# The flat modules that travel to the Hub as the model's custom code (setup.cfg's py_modules, the same list).
HANDLER_FILE = "handler.py"
EXAMPLE_IMAGE_FILE = "example_person.png"

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



def _measured_table(results: list[dict]) -> str:
    if not results:
        return "_No evaluation results were given when this card was written._\n"
    header = "| dataset | split | model selected on | " + " | ".join(METRIC_DISPLAY[m] for m in METRIC_NAMES) + " |"
    lines = [header, "|" + "---|" * (3 + len(METRIC_NAMES))]
    for result in results:
        selected = result.get("selected_on") or "not recorded"
        values = " | ".join(format_value(result["metrics"].get(name)) for name in METRIC_NAMES)
        lines.append(f"| {result['dataset_name']} | {result['split']} | {selected} | {values} |")
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
    conversion: Mapping[str, Any] | None = None,
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
            comma-separated str), "example_title"}``. Default: the example crop `publish` uploads; ``[]``: none.
        conversion: for weights converted from another checkpoint (`decd-convert`'s report, or the
            `conversion` record of a converted model's config): ``{"source", "format", "sha256"}`` and, when
            known, ``"source_dtypes", "dtype", "temperature", "sizes", "image_size", "notes", "dropped"``
            ({group: tensors} or a list of groups) and ``"dropped_parameters"`` ({group: values}).
    """
    results = check_results(results or [])
    if datasets is None:
        datasets = list(dict.fromkeys(result["dataset_type"] for result in results)) or None
    widget = []
    default_image = f"https://huggingface.co/{repo_id}/resolve/main/{EXAMPLE_IMAGE_FILE}"
    for index, example in enumerate([default_image] if widget_images is None else widget_images):
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
        tags=list(DEFAULT_TAGS) + (["converted"] if conversion else []),
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results(results) or None,
        widget=widget or None,
    )
    if conversion:
        intro = (f"A CLIP ViT **dual encoder** for text-based person search (retrieving pedestrian images from a\n"
                 f"free-text description), converted to DECD's format from `{conversion['source']}`; its weights were\n"
                 f"trained elsewhere, not with DECD's losses. It loads and runs like any DECD model (the dual encoder\n"
                 f"of [arXiv:{PAPER_ARXIV_ID}]({PAPER_URL}), whose decoder exists only during training).\n")
    else:
        base = f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model else "random initialisation"
        intro = f"""A CLIP-style **dual encoder** that retrieves pedestrian images from a free-text description
(text-based person search), trained with the recipe of *DECD* ([arXiv:{PAPER_ARXIV_ID}]({PAPER_URL})):
a similarity-distribution loss with caption-quality-adaptive margins (Sew) and a **detachable
cross-modal decoder** trained with masked caption modeling (MCM). The decoder exists only during
training; this repository holds the dual encoder (`get_text_features`, `get_image_features`), so
inference costs exactly what a CLIP model of the same size costs. Started from: {base}.
"""
    body = f"""
# {repo_id.split("/")[-1]}: DECD for text-based person search

{intro}
Images are person crops, resized (not cropped) to the processor's `image_size` (height, width; see
`processor_config.json`); captions are tokenised with CLIP's BPE (77 tokens, longer ones truncated).
{_conversion_section(conversion) if conversion else ""}
## Results measured for this model

Measured by this repository's evaluation code (text -> image retrieval, cosine similarity, no
re-ranking; percent). "Model selected on" is the split used to pick the checkpoint; the numbers are
on "split".

{_measured_table(results)}
## Published reference numbers (not measured here)

Reported in the respective papers on the standard test splits (R@1 / R@5 / R@10 / mAP / mINP, percent;
"-" = not reported). They are **not** results of this model, and most prior work selects checkpoints
on the test split. Compare only with measured numbers on the same dataset and split.

{published_table()}
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


def _conversion_section(conversion: Mapping[str, Any]) -> str:
    """Where converted weights came from, what the conversion changed, and what it dropped."""
    rows = [("source file", f"`{conversion['source']}`"), ("format", f"`{conversion['format']}`"),
            ("sha256 of the source", f"`{conversion['sha256']}`")]
    if conversion.get("source_dtypes"):
        rows.append(("source dtype", f"{', '.join(conversion['source_dtypes'])} (stored here as "
                                     f"{conversion.get('dtype', 'float32')})"))
    text = ("\n## Where the weights came from\n\nConverted to DECD's format by `decd-convert` (`decd/convert.py`). "
            "Embeddings equal those of OpenAI's CLIP code (`encode_text` / `encode_image`) on the same weights; the "
            "tokenizer is CLIP's BPE, as OpenAI's `SimpleTokenizer`. It fine-tunes further with "
            "`examples/train.py --model_name_or_path <folder>` (Sew + MCM; the decoder and heads start fresh).\n\n"
            "| | |\n|---|---|\n" + "".join(f"| {name} | {value} |\n" for name, value in rows))
    sizes = conversion.get("sizes")
    if sizes:
        height, width = conversion["image_size"]
        notes = "".join(f"- {note}\n" for note in conversion.get("notes", ()))
        text += f"""
## What changed in the conversion

- Parameter names: OpenAI layout -> transformers' CLIP layout (packed attention split into q/k/v,
  projections transposed). Activation QuickGELU, LayerNorm eps 1e-5, as OpenAI's CLIP.
- Vision: width {sizes['vision_width']}, {sizes['vision_layers']} layers, {sizes['vision_heads']} heads, patch
  {sizes['patch_size']}; the position table keeps its grid of {sizes['grid'][0]} x {sizes['grid'][1]} patches
  (input crops {height} x {width}, height x width).
- Text: width {sizes['text_width']}, {sizes['text_layers']} layers, {sizes['text_heads']} heads, context
  {sizes['context_length']}; the vocabulary of {sizes['vocab_size']:,} tokens gains DECD's mask token (id
  {sizes['vocab_size']}, initialised to the mean embedding; used only for MCM training). Pooling is at the
  end-of-text token (id {sizes['vocab_size'] - 1}), as OpenAI's argmax pooling over CLIP's vocabulary.
- Temperature: {conversion['temperature']} (`config.temperature`, used by the returned logits and the Sew loss).
  The checkpoint's own CLIP `logit_scale` is not used.
{notes}"""
    dropped = conversion.get("dropped") or {}
    counts = conversion.get("dropped_parameters") or {}
    if isinstance(dropped, Mapping):
        table = "".join(f"| `{name}` | {count} | {counts.get(name, 0):,} |\n" for name, count in dropped.items())
        text += "\n## Dropped\n\n| tensors | count | values |\n|---|---|---|\n" + (table or "| (nothing) | 0 | 0 |\n")
    else:
        text += "\n## Dropped\n\n" + (", ".join(f"`{name}`" for name in dropped) or "nothing") + "\n"
    return text
