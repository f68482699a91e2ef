"""Prompt templates for class text embeddings (``{}`` is replaced by the class name)."""

from __future__ import annotations

from dbtr.utils.errors import ConfigError

SIMPLE_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)

# The 80 ImageNet prompt templates released with CLIP (also used by TaI-DPT and CALIP).
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# TagCLIP's set (clip/clip.py encode_text_with_prompt_ensemble, from CLIP-ES): the 80 and five scene ones.
TAGCLIP_TEMPLATES: tuple[str, ...] = IMAGENET_TEMPLATES + (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "simple": SIMPLE_TEMPLATES,
    "imagenet": IMAGENET_TEMPLATES,
    "tagclip": TAGCLIP_TEMPLATES,
}


def get_templates(name_or_list: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Resolve a template-set name (``simple``, ``imagenet``) or an explicit list of ``{}`` templates."""
    if isinstance(name_or_list, str):
        if name_or_list not in TEMPLATE_SETS:
            raise ConfigError(
                f"unknown template set {name_or_list!r}; choose one of {sorted(TEMPLATE_SETS)} or give a list"
            )
        return TEMPLATE_SETS[name_or_list]
    templates = tuple(name_or_list)
    if not templates:
        raise ConfigError("the template list is empty")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ConfigError(
            f"every template needs a '{{}}' placeholder for the class name; these have none: {bad}"
        )
    return templates
