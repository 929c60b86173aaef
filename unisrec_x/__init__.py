"""unisrec-x: pretrained, transferable sequential recommendation through item text."""

__version__ = "0.1.0"
