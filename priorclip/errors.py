"""User-facing errors: the CLIs print these as one line and exit non-zero, without a traceback."""


class PriorCLIPError(Exception):
    """Base class for mistakes a user can fix (bad file, bad option, bad data)."""


class CheckpointError(PriorCLIPError):
    """A checkpoint file that cannot be read, or whose tensors do not match the model."""


class DataError(PriorCLIPError):
    """A dataset, image folder, caption file or image that cannot be used."""


class ImageTooLarge(DataError):
    """An image whose declared (or decoded) size is over the pixel limit: refused before its pixels are decoded."""
