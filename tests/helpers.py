"""Small builders shared by the tests: tiny configs and random batches (no network, no weights)."""

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

from configuration_decd import DecdConfig

BOS, EOS, MASK = 49406, 49407, 49408


def tiny_config(**overrides) -> DecdConfig:
    """An even smaller model than DecdConfig.tiny: 2 layers per encoder, 64x32 crops."""
    settings = dict(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        image_size=(128, 64), projection_dim=16, decoder_layers=1, decoder_hidden_size=32,
        decoder_attention_heads=4, decoder_intermediate_size=64,
    )
    settings.update(overrides)
    return DecdConfig.tiny(**settings)


def tiny_clip(tmp_path, image_size=32, patch_size=8):
    """A random transformers CLIP (vocabulary 1,000, 2 layers per encoder) saved in `tmp_path/tiny-clip`."""
    config = CLIPConfig(
        text_config=dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=998, eos_token_id=999,
                         pad_token_id=999),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=patch_size),
        projection_dim=24,
    )
    torch.manual_seed(0)
    clip = CLIPModel(config).eval()
    folder = tmp_path / "tiny-clip"
    clip.save_pretrained(folder)
    return clip, folder


def hub_cache(tmp_path: Path, folder: Path, repo_id: str) -> Path:
    """Lay `folder` out as the Hub cache would after a download of `repo_id` (for HF_HUB_OFFLINE=1)."""
    cache = tmp_path / "hub-cache"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    revision = "1234567890abcdef1234567890abcdef12345678"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for path in folder.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return cache


def use_offline_hub_cache(monkeypatch, cache: Path) -> None:
    """Make this process read the Hub from `cache` only (HF_HUB_OFFLINE), as with no network."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))


def random_batch(config: DecdConfig, batch_size: int = 6, length: int = 12, with_mcm: bool = True, seed: int = 0):
    """Random caption ids (SOT ... EOT, one padded row), images, identities in pairs, qualities, MCM inputs."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, BOS, (batch_size, length), generator=generator)
    input_ids[:, 0] = BOS
    input_ids[:, -1] = EOS
    attention_mask = torch.ones_like(input_ids)
    input_ids[0, length - 4:] = EOS  # a shorter caption, padded with EOT like CLIP
    attention_mask[0, length - 3:] = 0
    height, width = config.image_size
    batch = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=torch.randn(batch_size, 3, height, width, generator=generator),
        person_ids=torch.arange(batch_size) // 2,
        caption_quality=torch.rand(batch_size, generator=generator),
    )
    if with_mcm:
        labels = torch.full_like(input_ids, -100)
        masked = input_ids.clone()
        labels[:, 2:4] = input_ids[:, 2:4]
        masked[:, 2] = MASK
        masked[:, 3] = torch.randint(0, BOS, (batch_size,), generator=generator)
        batch.update(masked_input_ids=masked, mcm_labels=labels)
    return batch


# Prepended (after `REPO = "<repository root>"`) to scripts that must run without the repository's modules:
# a fresh interpreter that can only load DECD through the Hub remote-code path.
BLOCK_REPOSITORY_MODULES = """
import importlib.abc, os, sys
class _NoDecdPackage(importlib.abc.MetaPathFinder):
    blocked = {"configuration_decd", "modeling_decd", "processing_decd", "decd", "handler"}
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.blocked:
            raise ImportError(f"{name} is blocked: this process must not see the repository's modules")
sys.meta_path.insert(0, _NoDecdPackage())
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != REPO]
try:
    import modeling_decd
except ImportError:
    pass
else:
    raise SystemExit("the repository's modules are importable; the test would prove nothing")
"""


def save_tiny_model(folder, seed: int = 0):
    """A random tiny DECD model and its processor saved in `folder` (returned), as save_pretrained writes them."""
    from modeling_decd import DecdModel
    from processing_decd import DecdProcessor

    torch.manual_seed(seed)
    DecdModel(tiny_config()).save_pretrained(folder)
    DecdProcessor(image_size=(128, 64)).save_pretrained(folder)
    return folder
