"""MVAM processor."""

from .processing_image_text import ImageTextProcessor


class MVAMProcessor(ImageTextProcessor):
    """Prepares images and captions for [`MVAMModel`]: an image processor plus a tokenizer.
    See [`ImageTextProcessor`] for the accepted inputs."""


__all__ = ["MVAMProcessor"]
