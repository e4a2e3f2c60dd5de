"""A small synthetic text-based person search benchmark, generated on the fly and cached.

`generate_synthetic_person_search` draws pedestrian crops with PIL and writes them in exactly the
CUHK-PEDES layout (`ROOT/reid_raw.json` + `ROOT/imgs/...png`, see the protocol), so every loader
and evaluation path runs unchanged on it without downloading anything.

An identity is a distinct combination of visible attributes (upper and lower clothing colour and
type, bag, hat, shoes, hair, glasses); each image of it varies pose, scale, position, background,
brightness, blur and sometimes a partial occlusion. Each image has two captions that describe the
identity's attributes only (never the background): about 70% are DETAILED (5+ attributes) and 30%
VAGUE (1-2 attributes), so caption quality matters.

Everything is deterministic for a given seed: identity i, image k uses its own random stream.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

# Bump whenever the rendering or captions change: a cache with another version is regenerated.
SYNTHETIC_VERSION = "1.3"

# 1,000 training identities (v1.1 had 500): with the same number of training steps, twice the
# identities generalise better to the unseen test identities (docs/findings.md#why-1000-training-identities).
DEFAULT_NUM_TRAIN_IDS = 1000
# Identities are drawn in one sequence: the first (up to) this many training identities, then val, then
# test, then any further training identities, which never wear a val or test identity's clothing. So
# val and test stay the same when only the training set grows beyond it, and a larger training set is
# measured on the very same test split, whose outfits remain unseen in training.
TRAIN_IDS_DRAWN_FIRST = 500
DEFAULT_NUM_VAL_IDS = 50
DEFAULT_NUM_TEST_IDS = 100
DEFAULT_IMAGES_PER_ID = 4
DEFAULT_IMAGE_SIZE = (128, 64)  # (height, width) in pixels, like the usual person crops
CAPTIONS_PER_IMAGE = 2
DETAILED_CAPTION_FRACTION = 0.7

# Clearly distinct clothing colours; captions use the name (sometimes a synonym).
COLORS = {
    "red": (205, 30, 35),
    "blue": (35, 70, 210),
    "green": (35, 150, 55),
    "yellow": (240, 215, 40),
    "black": (25, 25, 28),
    "white": (242, 242, 242),
    "orange": (245, 135, 20),
    "purple": (125, 45, 165),
    "pink": (245, 140, 190),
    "grey": (130, 130, 130),
    "brown": (120, 75, 35),
}
# Synonyms are used sparingly so that the main colour words still dominate.
COLOR_SYNONYMS = {
    "red": ["crimson", "scarlet"],
    "grey": ["gray"],
    "purple": ["violet"],
    "pink": ["light pink"],
    "blue": ["navy"],
    "black": ["dark"],
}
COLOR_SYNONYM_PROBABILITY = 0.15

UPPER_TYPES = ["t-shirt", "long-sleeve shirt", "jacket", "dress"]
LOWER_TYPES = ["trousers", "shorts", "skirt"]
BAG_TYPES = ["none", "backpack", "handbag", "shoulder bag"]
BAG_COLORS = ["black", "brown", "red", "blue", "grey", "white", "green", "yellow"]
HAT_TYPES = ["none", "cap", "hat"]
HAT_COLORS = ["black", "white", "red", "blue", "yellow", "grey"]
SHOE_COLORS = ["black", "white", "brown", "red", "blue"]
HAIR_COLORS = {
    "black": (20, 18, 18),
    "brown": (95, 60, 30),
    "blonde": (225, 195, 110),
    "grey": (165, 165, 160),
}
SKIN_TONES = [(240, 205, 175), (215, 170, 130), (170, 120, 85), (110, 75, 50)]

GARMENT_SYNONYMS = {
    "t-shirt": ["t-shirt", "tee", "short-sleeved shirt", "t-shirt"],
    "long-sleeve shirt": ["long-sleeve shirt", "long-sleeved top", "shirt with long sleeves"],
    "jacket": ["jacket", "coat", "jacket"],
    "dress": ["dress", "dress"],
    "trousers": ["trousers", "pants", "trousers"],
    "shorts": ["shorts"],
    "skirt": ["skirt"],
}


@dataclass(frozen=True)
class PersonAttributes:
    """The visible attributes that define one synthetic identity.

    `upper_type == "dress"` means `lower_type` and `lower_color` are None (the dress covers both).
    `bag_color` / `hat_color` are None when there is no bag / hat. `skin_tone` is rendered but never
    described.
    """

    gender: str
    upper_color: str
    upper_type: str
    lower_color: Optional[str]
    lower_type: Optional[str]
    bag_type: str
    bag_color: Optional[str]
    hat_type: str
    hat_color: Optional[str]
    shoe_color: str
    hair_length: str
    hair_color: str
    glasses: bool
    skin_tone: int

    @property
    def clothing_key(self) -> tuple:
        """The dominant visual signal (large coloured areas); kept unique across identities when possible."""
        return (self.upper_color, self.upper_type, self.lower_color, self.lower_type)


# --------------------------------------------------------------------------------------------
# Identities
# --------------------------------------------------------------------------------------------


def sample_attributes(rng: np.random.Generator) -> PersonAttributes:
    """Draw one random attribute combination."""
    gender = "woman" if rng.random() < 0.5 else "man"
    colors = list(COLORS)
    upper_type = str(rng.choice(UPPER_TYPES if gender == "woman" else UPPER_TYPES[:3]))
    upper_color = str(rng.choice(colors))
    if upper_type == "dress":
        lower_type = lower_color = None
    else:
        lower_types = LOWER_TYPES if gender == "woman" else LOWER_TYPES[:2]
        # Trousers are the most common lower garment, as in the real datasets.
        weights = np.array([0.55, 0.25, 0.2][: len(lower_types)])
        lower_type = str(rng.choice(lower_types, p=weights / weights.sum()))
        lower_color = str(rng.choice([c for c in colors if c != upper_color]))
    bag_type = str(rng.choice(BAG_TYPES, p=[0.4, 0.25, 0.15, 0.2]))
    bag_color = None if bag_type == "none" else str(rng.choice(BAG_COLORS))
    hat_type = str(rng.choice(HAT_TYPES, p=[0.65, 0.2, 0.15]))
    hat_color = None if hat_type == "none" else str(rng.choice(HAT_COLORS))
    long_hair_probability = 0.75 if gender == "woman" else 0.15
    return PersonAttributes(
        gender=gender,
        upper_color=upper_color,
        upper_type=upper_type,
        lower_color=lower_color,
        lower_type=lower_type,
        bag_type=bag_type,
        bag_color=bag_color,
        hat_type=hat_type,
        hat_color=hat_color,
        shoe_color=str(rng.choice(SHOE_COLORS)),
        hair_length="long" if rng.random() < long_hair_probability else "short",
        hair_color=str(rng.choice(list(HAIR_COLORS), p=[0.45, 0.3, 0.15, 0.1])),
        glasses=bool(rng.random() < 0.2),
        skin_tone=int(rng.integers(len(SKIN_TONES))),
    )


def sample_identities(
    num_identities: int, seed: int = 0, reserve_clothing: range | None = None
) -> list[PersonAttributes]:
    """`num_identities` distinct attribute combinations, drawn without replacement.

    The clothing (upper/lower colour and type) is kept unique across identities while that space
    (about 1,000 combinations) is less than ~75% used, so identities differ in large coloured
    areas; beyond that only the full attribute combination is unique.

    `reserve_clothing`: positions (in drawing order) whose clothing no LATER identity may wear, even
    once the space is mostly used: the synthetic set reserves its val and test identities' clothing,
    so no training identity ever wears an evaluation identity's outfit. Identities drawn up to the end
    of that range are the same with or without it.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    identities: list[PersonAttributes] = []
    seen_full: set[PersonAttributes] = set()
    seen_clothing: set[tuple] = set()
    clothing_space = len(COLORS) * 3 * (len(COLORS) - 1) * len(LOWER_TYPES) + len(COLORS)
    reserved: set[tuple] = set()
    while len(identities) < num_identities:
        if reserve_clothing is not None and len(identities) == reserve_clothing.stop and not reserved:
            reserved = {identities[position].clothing_key for position in reserve_clothing}
        attributes = sample_attributes(rng)
        if attributes in seen_full or attributes.clothing_key in reserved:
            continue
        if attributes.clothing_key in seen_clothing and len(seen_clothing) < 0.75 * clothing_space:
            continue
        seen_full.add(attributes)
        seen_clothing.add(attributes.clothing_key)
        identities.append(attributes)
    return identities


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def _color_word(color: str, rng: np.random.Generator) -> str:
    if color in COLOR_SYNONYMS and rng.random() < COLOR_SYNONYM_PROBABILITY:
        return str(rng.choice(COLOR_SYNONYMS[color]))
    return color


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _garment(color: Optional[str], garment: str, rng: np.random.Generator, article: bool = True) -> str:
    name = str(rng.choice(GARMENT_SYNONYMS[garment]))
    phrase = f"{_color_word(color, rng)} {name}" if color else name
    # Plural garments take no article ("black trousers").
    if not article or name in ("trousers", "pants", "shorts"):
        return phrase
    return _article(phrase)


def _subject(attributes: PersonAttributes, rng: np.random.Generator) -> str:
    options = [f"a {attributes.gender}", "a person", "a pedestrian", f"a young {attributes.gender}",
               "a guy" if attributes.gender == "man" else "a lady"]
    return str(rng.choice(options, p=[0.45, 0.2, 0.15, 0.1, 0.1]))


def _pronoun(attributes: PersonAttributes) -> str:
    return "she" if attributes.gender == "woman" else "he"


def _details(attributes: PersonAttributes, rng: np.random.Generator) -> dict[str, str]:
    """Phrases for the optional attributes, keyed by kind."""
    details = {
        "hair": f"{attributes.hair_length} {attributes.hair_color} hair",
        "shoes": f"{_color_word(attributes.shoe_color, rng)} shoes",
    }
    if attributes.bag_type != "none":
        details["bag"] = _article(f"{_color_word(attributes.bag_color, rng)} {attributes.bag_type}")
    if attributes.hat_type != "none":
        details["hat"] = _article(f"{_color_word(attributes.hat_color, rng)} {attributes.hat_type}")
    if attributes.glasses:
        details["glasses"] = "glasses"
    return details


def _outfit(attributes: PersonAttributes, rng: np.random.Generator) -> tuple[str, Optional[str]]:
    upper = _garment(attributes.upper_color, attributes.upper_type, rng)
    lower = _garment(attributes.lower_color, attributes.lower_type, rng) if attributes.lower_type is not None else None
    return upper, lower


def _join(phrases: Sequence[str]) -> str:
    phrases = list(phrases)
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _capitalize(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def describe_identity(attributes: PersonAttributes, rng: np.random.Generator, detailed: bool = True) -> str:
    """One caption of the identity: DETAILED mentions 5+ attributes, VAGUE only 1-2.

    Captions describe the person's attributes only, never the background or the pose.
    """
    return _detailed_caption(attributes, rng) if detailed else _vague_caption(attributes, rng)


def _detailed_caption(attributes: PersonAttributes, rng: np.random.Generator) -> str:
    subject = _subject(attributes, rng)
    pronoun = _pronoun(attributes)
    upper, lower = _outfit(attributes, rng)
    outfit = f"{upper} and {lower}" if lower else upper
    details = _details(attributes, rng)
    kinds = list(details)
    rng.shuffle(kinds)
    # Upper + lower already give 4 attributes (a dress: 2), so add at least 2 (4) more.
    minimum_extra = 2 if lower else min(4, len(kinds))
    extra = kinds[: int(rng.integers(minimum_extra, len(kinds) + 1))]

    def has_phrase(kind: str) -> str:
        if kind == "glasses":
            return "wears glasses"
        verb = {"hat": "wears", "bag": "carries", "shoes": "wears", "hair": "has"}[kind]
        return f"{verb} {details[kind]}"

    template = int(rng.integers(5))
    if template == 0:
        carrying = [k for k in extra if k == "bag"]
        wearing = [k for k in extra if k != "bag"]
        sentence = f"{subject} in {outfit}"
        if wearing:
            sentence += " with " + _join([details[k] for k in wearing])
        if carrying:
            sentence += f" carrying {details['bag']}"
        return sentence + "."
    if template == 1:
        sentence = f"The pedestrian wears {outfit}. "
        sentence += _capitalize(pronoun) + " " + _join([has_phrase(k) for k in extra]) + "."
        return sentence
    if template == 2:
        first, rest = extra[0], extra[1:]
        sentence = f"This person has {details[first]} and is wearing {outfit}"
        if rest:
            sentence += ". " + _capitalize(pronoun) + " also " + _join([has_phrase(k) for k in rest])
        return sentence + "."
    if template == 3:
        sentence = _capitalize(subject) + f" wearing {outfit}, " + _join([details[k] for k in extra])
        return sentence + "."
    # A list-like description, close to how some annotators write.
    parts = [f"{subject}", f"{upper}"] + ([lower] if lower else []) + [details[k] for k in extra]
    return _capitalize(", ".join(parts)) + "."


def _vague_caption(attributes: PersonAttributes, rng: np.random.Generator) -> str:
    """Two attributes at most (usually the two clothing colours): typical of the short real captions."""
    subject = _subject(attributes, rng)
    upper_color = _color_word(attributes.upper_color, rng)
    options = [f"{subject} wearing {_garment(attributes.upper_color, attributes.upper_type, rng)}"]
    if attributes.lower_type is not None:
        lower_color = _color_word(attributes.lower_color, rng)
        options += [
            f"{subject} in {upper_color} and {lower_color}",
            f"someone dressed in {upper_color} and {lower_color}",
            f"{subject} in {_garment(attributes.lower_color, attributes.lower_type, rng)}",
        ]
    if attributes.bag_type != "none":
        options.append(f"{subject} in {upper_color} carrying {_article(attributes.bag_type)}")
    if attributes.hat_type != "none":
        options.append(f"{subject} in {upper_color} with {_article(_color_word(attributes.hat_color, rng) + ' ' + attributes.hat_type)}")
    caption = str(rng.choice(options))
    return caption if rng.random() < 0.5 else _capitalize(caption) + "."


def tokenize_caption(caption: str) -> list[str]:
    """Lower-cased word tokens, like the `processed_tokens` field of CUHK-PEDES."""
    return re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", caption.lower())


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _muted(rng: np.random.Generator, strength: float = 0.55) -> np.ndarray:
    """A random background colour pulled towards grey so that clothing colours stand out."""
    color = rng.integers(0, 256, size=3).astype(np.float32)
    gray = rng.uniform(70, 190)
    return (1 - strength) * color + strength * gray


def _background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    kind = int(rng.integers(3))
    if kind == 0:  # textured noise: coarse blocks compress far better in PNG than per-pixel noise
        block = int(rng.choice([4, 8]))
        coarse = rng.normal(0, 18, size=(height // block + 1, width // block + 1, 1))
        texture = np.kron(coarse, np.ones((block, block, 1)))[:height, :width]
        image = _muted(rng)[None, None, :] + texture
    elif kind == 1:  # a gradient between two colours, vertical or horizontal
        start, end = _muted(rng), _muted(rng)
        length = height if rng.random() < 0.7 else width
        ramp = np.linspace(0, 1, length, dtype=np.float32)[:, None]
        line = (1 - ramp) * start + ramp * end
        image = np.repeat(line[:, None, :], width, axis=1) if length == height else np.repeat(line[None], height, axis=0)
    else:  # a street: facade stripes above a pavement with horizontal lines
        image = np.zeros((height, width, 3), dtype=np.float32)
        x = 0
        while x < width:
            stripe = int(rng.integers(6, 24))
            image[:, x : x + stripe] = _muted(rng, 0.6)
            x += stripe
        horizon = int(height * rng.uniform(0.55, 0.75))
        image[horizon:] = _muted(rng, 0.8)
        for y in range(horizon + int(rng.integers(3, 8)), height, int(rng.integers(6, 12))):
            image[y] *= 0.85
    return np.clip(image, 0, 255).astype(np.uint8)


def _limb(draw: ImageDraw.ImageDraw, start, end, width: float, color) -> None:
    """A thick segment with rounded ends."""
    width = max(1, int(round(width)))
    draw.line([start, end], fill=color, width=width)
    radius = width / 2
    for x, y in (start, end):
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color)


def _point(origin, length: float, angle_degrees: float):
    """The end of a segment of `length` from `origin`, `angle_degrees` away from straight down."""
    angle = np.deg2rad(angle_degrees)
    return (origin[0] + length * np.sin(angle), origin[1] + length * np.cos(angle))


def render_person(
    attributes: PersonAttributes,
    rng: np.random.Generator,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
) -> Image.Image:
    """One RGB crop (PIL, `image_size` = (height, width)) of the identity in a random pose and scene."""
    height, width = image_size
    canvas = Image.fromarray(_background(height, width, rng))
    draw = ImageDraw.Draw(canvas)

    scale = rng.uniform(0.8, 0.96)
    person = height * scale  # person height in pixels
    unit = person / 128  # sizes below are in pixels of a 128-pixel tall person
    center_x = width / 2 + rng.uniform(-0.1, 0.1) * width
    feet_y = height - rng.uniform(0.01, 0.04) * height
    top = feet_y - person

    def y(fraction: float) -> float:
        return top + fraction * person

    pose = str(rng.choice(["front", "walking", "side"], p=[0.4, 0.35, 0.25]))
    facing = 1 if rng.random() < 0.5 else -1  # side view: which way the person looks
    side = pose == "side"
    shoulder_half = (9 if side else 14) * unit
    hip_half = (8 if side else 11) * unit
    leg_width = 9 * unit
    arm_width = 6.5 * unit
    skin = SKIN_TONES[attributes.skin_tone]
    upper = COLORS[attributes.upper_color]
    hair = HAIR_COLORS[attributes.hair_color]
    head_radius = 8 * unit
    head = (center_x + (1.5 * unit * facing if side else 0), y(0.075))

    # Legs: swing angles from the hip, in degrees from vertical.
    if pose == "front":
        leg_angles = [rng.uniform(2, 7), -rng.uniform(2, 7)]
        arm_angles = [rng.uniform(6, 14), -rng.uniform(6, 14)]
    elif pose == "walking":
        stride = rng.uniform(10, 22)
        leg_angles = [stride, -stride]
        arm_angles = [-stride * 0.8 + 8, stride * 0.8 - 8]
    else:
        stride = rng.uniform(8, 24)
        leg_angles = [stride, -stride]
        arm_angles = [stride * 0.9 * facing, -stride * 0.6 * facing]
    hip_y, knee_fraction = y(0.50), 0.5
    leg_length = feet_y - 3 * unit - hip_y
    hips = [(center_x - hip_half * 0.45, hip_y), (center_x + hip_half * 0.45, hip_y)]
    if side:
        hips = [(center_x, hip_y), (center_x, hip_y)]
    feet = [_point(hip, leg_length, angle) for hip, angle in zip(hips, leg_angles)]
    knees = [_point(hip, leg_length * knee_fraction, angle) for hip, angle in zip(hips, leg_angles)]

    shoulders = [(center_x - shoulder_half + arm_width / 2, y(0.17)), (center_x + shoulder_half - arm_width / 2, y(0.17))]
    if side:
        shoulders = [(center_x, y(0.17)), (center_x, y(0.17))]
    arm_length = 0.33 * person
    hands = [_point(s, arm_length, a) for s, a in zip(shoulders, arm_angles)]
    elbows = [_point(s, arm_length * 0.48, a) for s, a in zip(shoulders, arm_angles)]

    # Long hair falls behind the shoulders: drawn first.
    if attributes.hair_length == "long":
        draw.rectangle([head[0] - head_radius * 1.05, head[1], head[0] + head_radius * 1.05, y(0.27)], fill=hair)

    # A backpack sits behind the torso: visible at the back (side view) or at both sides (front).
    if attributes.bag_type == "backpack":
        bag = COLORS[attributes.bag_color]
        if side:
            back = center_x - facing * (shoulder_half + 7 * unit)
            draw.rounded_rectangle([min(back, center_x), y(0.19), max(back, center_x), y(0.45)], radius=3 * unit, fill=bag)
        else:
            draw.rounded_rectangle([center_x - shoulder_half - 3 * unit, y(0.2), center_x + shoulder_half + 3 * unit, y(0.44)],
                                   radius=3 * unit, fill=bag)

    # Lower body.
    shoe = COLORS[attributes.shoe_color]
    lower = COLORS[attributes.lower_color] if attributes.lower_color else skin
    for hip, knee, foot in zip(hips, knees, feet):
        _limb(draw, hip, foot, leg_width, skin)
        if attributes.lower_type == "trousers":
            _limb(draw, hip, foot, leg_width + 1, lower)
        elif attributes.lower_type == "shorts":
            _limb(draw, hip, _point(hip, leg_length * 0.45, np.degrees(np.arctan2(foot[0] - hip[0], foot[1] - hip[1]))),
                  leg_width + 1.5, lower)
        draw.ellipse([foot[0] - 6 * unit + facing * 2 * unit * side, foot[1] - 2 * unit,
                      foot[0] + 6 * unit + facing * 2 * unit * side, foot[1] + 4 * unit], fill=shoe)
    if attributes.lower_type in ("trousers", "shorts"):  # the pelvis joins the two legs
        draw.polygon([(center_x - hip_half, y(0.47)), (center_x + hip_half, y(0.47)),
                      (center_x + hip_half * 0.8, y(0.57)), (center_x - hip_half * 0.8, y(0.57))], fill=lower)
    skirt_color = upper if attributes.upper_type == "dress" else lower
    if attributes.lower_type == "skirt" or attributes.upper_type == "dress":
        hem = y(0.73 if attributes.upper_type == "dress" else 0.7)
        flare = hip_half + 7 * unit
        draw.polygon([(center_x - hip_half, y(0.45)), (center_x + hip_half, y(0.45)),
                      (center_x + flare, hem), (center_x - flare, hem)], fill=skirt_color)

    # Torso (upper clothing), with the neck above it.
    _limb(draw, (head[0], head[1] + head_radius * 0.5), (center_x, y(0.18)), 6 * unit, skin)
    torso_bottom = y(0.53 if attributes.upper_type == "jacket" else 0.5)
    torso = [(center_x - shoulder_half, y(0.16)), (center_x + shoulder_half, y(0.16)),
             (center_x + hip_half, torso_bottom), (center_x - hip_half, torso_bottom)]
    draw.polygon(torso, fill=upper)
    if attributes.upper_type == "jacket" and not side:
        inner = (235, 235, 235) if attributes.upper_color != "white" else (60, 60, 60)
        draw.polygon([(center_x - 3 * unit, y(0.165)), (center_x + 3 * unit, y(0.165)),
                      (center_x + 2 * unit, torso_bottom), (center_x - 2 * unit, torso_bottom)], fill=inner)
        draw.line([(center_x - 3 * unit, y(0.165)), (center_x - 7 * unit, y(0.27))], fill=tuple(int(c * 0.6) for c in upper), width=max(1, int(2 * unit)))
        draw.line([(center_x + 3 * unit, y(0.165)), (center_x + 7 * unit, y(0.27))], fill=tuple(int(c * 0.6) for c in upper), width=max(1, int(2 * unit)))
    if attributes.bag_type == "backpack" and not side:  # straps over the shoulders
        bag = COLORS[attributes.bag_color]
        for sign in (-1, 1):
            draw.line([(center_x + sign * shoulder_half * 0.55, y(0.16)), (center_x + sign * shoulder_half * 0.6, y(0.38))],
                      fill=bag, width=max(1, int(2.5 * unit)))

    # Arms: sleeves in the upper colour; a t-shirt (or dress) shows bare forearms.
    sleeve_to_hand = attributes.upper_type in ("long-sleeve shirt", "jacket")
    arm_order = [1, 0] if side and facing > 0 else [0, 1]
    for index in arm_order:
        shoulder, elbow, hand = shoulders[index], elbows[index], hands[index]
        _limb(draw, shoulder, hand, arm_width, skin)
        _limb(draw, shoulder, hand if sleeve_to_hand else elbow, arm_width + 1, upper)
        draw.ellipse([hand[0] - 2.5 * unit, hand[1] - 2.5 * unit, hand[0] + 2.5 * unit, hand[1] + 2.5 * unit], fill=skin)

    # Bags carried in front.
    if attributes.bag_type == "handbag":
        bag = COLORS[attributes.bag_color]
        hand = hands[1 if rng.random() < 0.5 else 0]
        draw.arc([hand[0] - 4 * unit, hand[1] - 3 * unit, hand[0] + 4 * unit, hand[1] + 5 * unit], 180, 360, fill=bag, width=max(1, int(1.5 * unit)))
        draw.rectangle([hand[0] - 6 * unit, hand[1] + 2 * unit, hand[0] + 6 * unit, hand[1] + 12 * unit], fill=bag)
    elif attributes.bag_type == "shoulder bag":
        bag = COLORS[attributes.bag_color]
        sign = 1 if rng.random() < 0.5 else -1
        bag_x = center_x + sign * (hip_half + 1 * unit)
        draw.line([(center_x - sign * shoulder_half * 0.7, y(0.165)), (bag_x, y(0.46))], fill=bag, width=max(1, int(2.5 * unit)))
        draw.rectangle([bag_x - 6 * unit, y(0.44), bag_x + 6 * unit, y(0.54)], fill=bag)

    # Head, hair, hat, glasses.
    x0, y0 = head
    draw.ellipse([x0 - head_radius, y0 - head_radius, x0 + head_radius, y0 + head_radius], fill=skin)
    draw.chord([x0 - head_radius * 1.08, y0 - head_radius * 1.12, x0 + head_radius * 1.08, y0 + head_radius * 0.9], 180, 360, fill=hair)
    if side:  # hair covers the back of the head
        back = -facing
        draw.pieslice([x0 - head_radius * 1.05, y0 - head_radius * 1.05, x0 + head_radius * 1.05, y0 + head_radius * 1.05],
                      90 if back < 0 else 270, 270 if back < 0 else 450, fill=hair)
    if attributes.hat_type != "none":
        hat = COLORS[attributes.hat_color]
        if attributes.hat_type == "cap":
            draw.chord([x0 - head_radius * 1.1, y0 - head_radius * 1.25, x0 + head_radius * 1.1, y0 + head_radius * 0.6], 180, 360, fill=hat)
            visor = facing if side else 0
            draw.rectangle([x0 - head_radius * (0.9 - visor * 0.8), y0 - head_radius * 0.45,
                            x0 + head_radius * (0.9 + visor * 0.8), y0 - head_radius * 0.2], fill=hat)
        else:
            draw.ellipse([x0 - head_radius * 1.7, y0 - head_radius * 0.75, x0 + head_radius * 1.7, y0 - head_radius * 0.3], fill=hat)
            draw.rectangle([x0 - head_radius * 0.95, y0 - head_radius * 1.6, x0 + head_radius * 0.95, y0 - head_radius * 0.5], fill=hat)
    if attributes.glasses:
        glasses_y = y0 + head_radius * 0.05
        if side:
            draw.line([(x0, glasses_y), (x0 + facing * head_radius, glasses_y)], fill=(15, 15, 15), width=max(1, int(1.5 * unit)))
        else:
            for sign in (-1, 1):
                ex = x0 + sign * head_radius * 0.4
                draw.ellipse([ex - 2.2 * unit, glasses_y - 2 * unit, ex + 2.2 * unit, glasses_y + 2 * unit], outline=(15, 15, 15), width=1)

    # Occasional occlusion: a box over less than 25% of the crop and at most 20% of its height, less
    # than the torso or the legs, so part of both the upper and the lower clothing stays visible.
    if rng.random() < 0.15:
        box_width = rng.uniform(0.3, 0.8) * width
        box_height = rng.uniform(0.08, 0.2) * height
        left = rng.uniform(-0.1 * width, width - 0.9 * box_width)
        box_top = rng.uniform(0, height - box_height)
        draw.rectangle([left, box_top, left + box_width, box_top + box_height], fill=tuple(int(c) for c in _muted(rng, 0.4)))

    if rng.random() < 0.5:
        canvas = canvas.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.9))))
    pixels = np.asarray(canvas, dtype=np.float32)
    pixels = pixels * rng.uniform(0.8, 1.15) * rng.uniform(0.95, 1.05, size=3)  # brightness + slight white balance
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------------------------
# The benchmark on disk
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """`$DECD_CACHE` if set, else `~/.cache/decd`."""
    return Path(os.environ.get("DECD_CACHE") or Path.home() / ".cache" / "decd").expanduser()


def _parameters(num_train_ids, num_val_ids, num_test_ids, images_per_id, image_size, seed) -> dict:
    return {
        "version": SYNTHETIC_VERSION,
        "num_train_ids": int(num_train_ids),
        "num_val_ids": int(num_val_ids),
        "num_test_ids": int(num_test_ids),
        "images_per_id": int(images_per_id),
        "image_size": [int(image_size[0]), int(image_size[1])],
        "seed": int(seed),
        "captions_per_image": CAPTIONS_PER_IMAGE,
    }


def _cached(root: os.PathLike | str, parameters: dict, data_file: str, overwrite: bool, write) -> Path:
    """The set in `root`: reused as it is when its meta.json records `parameters` and `data_file` exists (a cache
    hit writes nothing) unless `overwrite`, else written by `write(folder)` (see `_write_atomically`)."""
    root = Path(root).expanduser().absolute()
    try:
        meta = json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        meta = None
    if not overwrite and meta is not None and meta.get("parameters") == parameters and (root / data_file).is_file():
        logger.debug("synthetic data: cache hit at %s", root)
        return root
    return _write_atomically(root, write)


def generate_synthetic_person_search(
    root: Optional[os.PathLike | str] = None,
    num_train_ids: int = DEFAULT_NUM_TRAIN_IDS,
    num_val_ids: int = DEFAULT_NUM_VAL_IDS,
    num_test_ids: int = DEFAULT_NUM_TEST_IDS,
    images_per_id: int = DEFAULT_IMAGES_PER_ID,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write (or reuse) the synthetic benchmark and return its root folder.

    Layout, exactly CUHK-PEDES: `ROOT/reid_raw.json` (a list of records with `id` (1-based int),
    `file_path` (relative to `ROOT/imgs/`), `captions` (2 strings), `split` ("train"/"val"/"test"),
    `processed_tokens`), the PNG crops under `ROOT/imgs/`, and `ROOT/meta.json` (the generation
    parameters and `SYNTHETIC_VERSION`, plus each identity's attributes).

    Train, val and test identities are disjoint. Ids follow the drawing order: up to
    `TRAIN_IDS_DRAWN_FIRST` (500) train identities, then val, then test, then the remaining train
    identities, so val and test do not change when `num_train_ids` grows past 500; no train identity
    wears the clothing (upper and lower colour and type) of a val or test identity.
    `image_size` is (height, width) in pixels. A second call with the same parameters is a cache hit
    and writes nothing; different parameters (or `overwrite=True`) regenerate. The set is built in a
    temporary folder next to ROOT and renamed into place, so an interrupted run never leaves a half
    cache.

    Default ROOT: `$DECD_CACHE/synthetic-v1` (`$DECD_CACHE` defaults to `~/.cache/decd`); parameters
    other than the defaults get their own folder `synthetic-v1-<hash>` so they never evict it.
    """
    parameters = _parameters(num_train_ids, num_val_ids, num_test_ids, images_per_id, image_size, seed)
    if min(num_train_ids, num_val_ids, num_test_ids) < 0 or images_per_id < 1:
        raise ValueError(f"identity counts must be >= 0 and images_per_id >= 1, got {parameters}")
    if root is None:
        name = "synthetic-v1"
        if parameters != _parameters(DEFAULT_NUM_TRAIN_IDS, DEFAULT_NUM_VAL_IDS, DEFAULT_NUM_TEST_IDS,
                                     DEFAULT_IMAGES_PER_ID, DEFAULT_IMAGE_SIZE, 0):
            digest = hashlib.sha1(json.dumps(parameters, sort_keys=True).encode()).hexdigest()[:10]
            name = f"{name}-{digest}"
        root = default_cache_dir() / name
    return _cached(root, parameters, "reid_raw.json", overwrite,
                   lambda folder: _write_benchmark(folder, parameters, progress))


def person_search_identities(
    num_train_ids: int = DEFAULT_NUM_TRAIN_IDS,
    num_val_ids: int = DEFAULT_NUM_VAL_IDS,
    num_test_ids: int = DEFAULT_NUM_TEST_IDS,
    seed: int = 0,
) -> list[tuple[PersonAttributes, str]]:
    """The identities of `generate_synthetic_person_search` with these sizes and seed, in id order (id = index + 1),
    each with its split: up to `TRAIN_IDS_DRAWN_FIRST` train, then val, then test, then the remaining train ones."""
    first_train = min(num_train_ids, TRAIN_IDS_DRAWN_FIRST)
    split_sizes = [("train", first_train), ("val", num_val_ids), ("test", num_test_ids),
                   ("train", num_train_ids - first_train)]
    # Val and test clothing is reserved: the training identities drawn after them never wear it.
    evaluation = range(first_train, first_train + num_val_ids + num_test_ids)
    identities = sample_identities(sum(size for _, size in split_sizes), seed, reserve_clothing=evaluation)
    splits = [name for name, size in split_sizes for _ in range(size)]
    return list(zip(identities, splits))


def _write_atomically(root: Path, write) -> Path:
    """`write(folder)` into a staging folder renamed to `root` at the end: an interruption leaves no half set."""
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        write(staging)
        _replace_directory(staging, root)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return root


def _replace_directory(source: Path, target: Path) -> None:
    """Move `source` to `target`, replacing an old `target` (renames only, so readers never see a half state)."""
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, trash / target.name)
        try:
            os.replace(source, target)
        finally:
            shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(source, target)


def _write_benchmark(folder: Path, parameters: dict, progress: bool) -> None:
    seed = parameters["seed"]
    image_size = tuple(parameters["image_size"])
    images_per_id = parameters["images_per_id"]
    drawn = person_search_identities(parameters["num_train_ids"], parameters["num_val_ids"],
                                     parameters["num_test_ids"], seed)
    records = []
    bar = tqdm(total=len(drawn) * images_per_id, desc="synthetic person search", unit="img", disable=not progress)
    for index, (attributes, split) in enumerate(drawn):
        person_id = index + 1  # 1-based, like CUHK-PEDES
        (folder / "imgs" / split).mkdir(parents=True, exist_ok=True)
        for image_index in range(images_per_id):
            # Independent streams per (identity, image): rendering and captions never shift each other.
            render_rng = np.random.default_rng(np.random.SeedSequence([seed, 1, person_id, image_index]))
            caption_rng = np.random.default_rng(np.random.SeedSequence([seed, 2, person_id, image_index]))
            file_path = f"{split}/{person_id:05d}_{image_index}.png"
            render_person(attributes, render_rng, image_size).save(folder / "imgs" / file_path, compress_level=9)
            captions = [
                describe_identity(attributes, caption_rng, detailed=bool(caption_rng.random() < DETAILED_CAPTION_FRACTION))
                for _ in range(CAPTIONS_PER_IMAGE)
            ]
            records.append({
                "split": split,
                "captions": captions,
                "file_path": file_path,
                "processed_tokens": [tokenize_caption(caption) for caption in captions],
                "id": person_id,
            })
            bar.update()
    bar.close()

    (folder / "reid_raw.json").write_text(json.dumps(records, ensure_ascii=False))
    meta = {
        "parameters": parameters,
        "num_images": len(records),
        "identities": {str(index + 1): asdict(attributes) for index, (attributes, _) in enumerate(drawn)},
    }
    # meta.json last: its presence with matching parameters is what marks the set complete.
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


# --------------------------------------------------------------------------------------------
# A captioned-image corpus for pretraining CLIP (not the person-search task)
# --------------------------------------------------------------------------------------------

# Bump whenever the corpus's rendering or captions change: a cache with another version is regenerated.
CAPTIONED_VERSION = "1.0"
DEFAULT_CAPTIONED_IMAGES = 8000
DEFAULT_CAPTIONED_IMAGE_SIZE = (112, 112)  # square, like CLIP's inputs (patch 16: a 7 x 7 grid)


def _captioned_parameters(num_images, image_size, seed, person_search) -> dict:
    return {
        "version": CAPTIONED_VERSION,
        "num_images": int(num_images),
        "image_size": [int(image_size[0]), int(image_size[1])],
        "seed": int(seed),
        "reserved_person_search": {key: int(value) for key, value in sorted(person_search.items())},
    }


def reserved_person_search_clothing(
    num_train_ids: int = DEFAULT_NUM_TRAIN_IDS,
    num_val_ids: int = DEFAULT_NUM_VAL_IDS,
    num_test_ids: int = DEFAULT_NUM_TEST_IDS,
    seed: int = 0,
) -> set[tuple]:
    """The clothing (`PersonAttributes.clothing_key`) of every identity of that person-search set: train (the
    first 500 and the further ones), val and test."""
    return {attributes.clothing_key
            for attributes, _ in person_search_identities(num_train_ids, num_val_ids, num_test_ids, seed)}


def generate_synthetic_captioned_images(
    root: Optional[os.PathLike | str] = None,
    num_images: int = DEFAULT_CAPTIONED_IMAGES,
    image_size: tuple[int, int] | int = DEFAULT_CAPTIONED_IMAGE_SIZE,
    seed: int = 0,
    person_search: Optional[dict] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write (or reuse) a corpus of captioned images for pretraining CLIP, and return its root folder.

    It is NOT a person-search set: every image is rendered once, with ONE detailed caption, and there are no
    identities. Each image draws a fresh attribute combination whose clothing (upper and lower colour and
    type) is worn by NO identity of the person-search set `person_search` (keyword arguments of
    `generate_synthetic_person_search`: num_train_ids, num_val_ids, num_test_ids, seed; default: the default
    set), neither train (including the identities drawn after test) nor val nor test. So a CLIP pretrained
    on it has never seen any person-search outfit. The pictures are square (`image_size` (height, width) or one
    side), drawn by the same renderer.

    Layout: `ROOT/captions.json` (a list of `{"file_path": "imgs/<n>.png", "caption": str}`), the PNGs under
    `ROOT/imgs/`, `ROOT/meta.json` (parameters, written last). Cached like the person-search set: a second call
    with the same parameters writes nothing; the folder is built next to ROOT and renamed into place.
    Default ROOT: `$DECD_CACHE/captioned-v1-<hash of the parameters>`.
    """
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    reserved_set = dict(num_train_ids=DEFAULT_NUM_TRAIN_IDS, num_val_ids=DEFAULT_NUM_VAL_IDS,
                        num_test_ids=DEFAULT_NUM_TEST_IDS, seed=0)
    unknown = set(person_search or {}) - set(reserved_set)
    if unknown:
        raise ValueError(f"person_search takes {sorted(reserved_set)}, got unknown {sorted(unknown)}")
    reserved_set.update(person_search or {})
    if num_images < 1 or min(image_size) < 1:
        raise ValueError(f"num_images and image_size must be positive, got {num_images} and {image_size}")
    parameters = _captioned_parameters(num_images, image_size, seed, reserved_set)
    if root is None:
        digest = hashlib.sha1(json.dumps(parameters, sort_keys=True).encode()).hexdigest()[:10]
        root = default_cache_dir() / f"captioned-v1-{digest}"
    return _cached(root, parameters, "captions.json", overwrite,
                   lambda folder: _write_captioned_images(folder, parameters, progress))


def _write_captioned_images(folder: Path, parameters: dict, progress: bool) -> None:
    seed = parameters["seed"]
    image_size = tuple(parameters["image_size"])
    reserved = reserved_person_search_clothing(**parameters["reserved_person_search"])
    # Streams of their own ([seed, 3..5]): the person-search set uses [seed, 0..2].
    rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))
    (folder / "imgs").mkdir(parents=True)
    records = []
    free_clothing: set[tuple] = set()
    bar = tqdm(total=parameters["num_images"], desc="synthetic captioned images", unit="img", disable=not progress)
    attempts = 0
    while len(records) < parameters["num_images"]:
        attempts += 1
        if attempts > 1000 * (len(records) + 1):
            raise ValueError("no clothing is left that the reserved person-search set does not wear; "
                             "reserve a smaller person-search set")
        attributes = sample_attributes(rng)
        if attributes.clothing_key in reserved:
            continue
        index = len(records)
        render_rng = np.random.default_rng(np.random.SeedSequence([seed, 4, index]))
        caption_rng = np.random.default_rng(np.random.SeedSequence([seed, 5, index]))
        file_path = f"imgs/{index:06d}.png"
        render_person(attributes, render_rng, image_size).save(folder / file_path, compress_level=6)
        records.append({"file_path": file_path, "caption": describe_identity(attributes, caption_rng, detailed=True),
                        "clothing": list(attributes.clothing_key)})
        free_clothing.add(attributes.clothing_key)
        bar.update()
    bar.close()
    (folder / "captions.json").write_text(json.dumps(records, ensure_ascii=False))
    meta = {"parameters": parameters, "num_images": len(records), "num_clothing": len(free_clothing),
            "num_reserved_clothing": len(reserved)}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
