"""Shared fixtures: a tiny random Llama and a LoRA adapter for it (factories in ``helpers.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import make_adapter, make_llama


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pipeline.common import quiet_libraries

    quiet_libraries()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def tiny_adapter(tiny_base, tmp_path_factory) -> Path:
    return make_adapter(tiny_base, tmp_path_factory.mktemp("tiny") / "adapter")
