"""Errors the pipeline raises on purpose. Each maps to an exit code in ``pipeline.__main__``."""


class InputError(Exception):
    """Bad input from the user (config, paths, adapter/base mismatch). Exit code 2."""


class VerificationError(Exception):
    """An artefact failed its verification; nothing was published. Exit code 3."""
