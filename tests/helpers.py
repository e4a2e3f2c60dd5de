"""Small builders shared by the tests: tiny configs and random batches (no network, no weights)."""

import torch

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
