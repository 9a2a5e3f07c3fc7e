"""The processor both models share: an image processor plus a tokenizer, with the input checks that
keep bad input from crashing deep inside torch.

Remote code (the model processors subclass it), so it imports only third-party packages and
siblings of its folder.
"""

from __future__ import annotations

from transformers import ProcessorMixin
from transformers.utils import logging

from .image_loading import load_image


def _drop_model_type_mismatch_warning(record) -> bool:
    """Logging filter: False (drop) for transformers' "model of type X to instantiate a model of
    type Y" warning, True for every other record."""
    return "to instantiate a model of type" not in record.getMessage()


class ImageTextProcessor(ProcessorMixin):
    """Image processor + tokenizer, called like CLIP's processor:
    ``processor(images=[...], text=[...], return_tensors="pt", padding=True)``.

    Images may be anything :func:`load_image` takes (PIL images in any mode, numpy arrays, file
    paths, URLs, base64 strings, encoded bytes, ``datasets.Image(decode=False)`` dicts); each is
    decoded by it, and an unreadable one raises a ValueError naming it. Text is a string or a list
    of non-empty strings.

    Keyword arguments are routed as ``ProcessorMixin.__call__`` routes them: image-processor ones
    (``do_center_crop``, ``size``, ...) to the image processor, tokenizer ones (``padding``,
    ``max_length``, ...) to the tokenizer, or per modality as ``images_kwargs={...}`` /
    ``text_kwargs={...}``; an unknown one is ignored with a warning. Unlike CLIP's processor,
    captions are padded and truncated, and tensors are PyTorch's, unless told otherwise.

    Args:
        image_processor: e.g. ``CLIPImageProcessorPil`` (resize, crop, normalise).
        tokenizer: any fast tokenizer, e.g. one trained with `hf_mvam.tokenization`.
    """

    # Defaults at the lowest priority of ProcessorMixin._merge_kwargs: any call argument wins.
    text_kwargs = {"padding": True, "truncation": True, "return_tensors": "pt"}
    images_kwargs = {"return_tensors": "pt"}

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, trust_remote_code: bool = False, **kwargs):
        """Load from a folder or Hub id. The class is already in hand, so its tokenizer and image
        processor load with transformers' own classes; without ``trust_remote_code=False`` the
        folder's ``auto_map`` (written for AutoProcessor) makes transformers ask whether to run it.
        AutoProcessor, loading this class as remote code, passes its own ``trust_remote_code``."""
        # Without remote code, AutoTokenizer reads config.json as a plain PretrainedConfig (model
        # type "") and warns that it differs from the folder's model type. The tokenizer's class
        # comes from tokenizer_config.json, so that one warning is noise: filtered for this call.
        config_logger = logging.get_logger("transformers.configuration_utils")
        config_logger.addFilter(_drop_model_type_mismatch_warning)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, trust_remote_code=trust_remote_code, **kwargs)
        finally:
            config_logger.removeFilter(_drop_model_type_mismatch_warning)

    def __call__(self, images=None, text=None, **kwargs):
        if text is None and images is None:
            raise ValueError("pass text=..., images=... or both")
        if text is not None:
            text = self._check_text(text)
        if images is not None:
            images = [load_image(image, name=f"images[{i}]") for i, image in enumerate(self._as_list(images))]
            if not images:
                raise ValueError("images is an empty list")
        return super().__call__(images=images, text=text, **kwargs)

    @staticmethod
    def _as_list(items):
        return list(items) if isinstance(items, (list, tuple)) else [items]

    def _check_text(self, text):
        texts = self._as_list(text)
        if not texts:
            raise ValueError("text is an empty list")
        for i, caption in enumerate(texts):
            if not isinstance(caption, str):
                raise ValueError(f"text[{i}] must be a string, got {type(caption).__name__}")
            if not caption.strip():
                raise ValueError(f"text[{i}] is an empty caption")
        return texts

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)
