"""UARDA processor."""

from .processing_image_text import ImageTextProcessor


class UARDAProcessor(ImageTextProcessor):
    """Prepares images and captions for [`UARDAModel`]: an image processor plus a tokenizer.
    See [`ImageTextProcessor`] for the accepted inputs. Models built on precomputed region
    features only use its tokenizer."""


__all__ = ["UARDAProcessor"]
