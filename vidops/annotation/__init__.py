"""Annotation models: captioners that write captions for clips that arrived without one."""

from vidops.annotation.captioners import (
    Captioner,
    CaptionerError,
    TransformersCaptioner,
    load_captioner,
)

__all__ = ["Captioner", "CaptionerError", "TransformersCaptioner", "load_captioner"]
