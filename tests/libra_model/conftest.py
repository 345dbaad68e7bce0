"""Fixtures of the libra_model tests: the tiny checkpoint, built once, and a network block."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

# Set before transformers reads it. The network block below catches any access that slips through.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from libra_model.modeling_libra import LibraForCausalLM  # noqa: E402
from libra_model.tiny import build_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny random checkpoint, built once per session. Tests must not modify it."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("libra") / "libra-tiny")


@pytest.fixture
def tiny_checkpoint_copy(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of the tiny checkpoint that a test may change."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "libra-tiny"))


@pytest.fixture
def tiny_model(tiny_checkpoint) -> LibraForCausalLM:
    """The tiny checkpoint loaded on the CPU in float32."""
    return LibraForCausalLM.from_pretrained(tiny_checkpoint)


@pytest.fixture
def block_network(monkeypatch):
    """Make every IPv4 or IPv6 connection attempt raise, loopback included."""
    original_connect = socket.socket.connect
    original_connect_ex = socket.socket.connect_ex

    def refuse(self, address, *args, **kwargs):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"libra_model test tried to connect to {address!r}, but model code must stay offline")
        return original_connect(self, address, *args, **kwargs)

    def refuse_ex(self, address, *args, **kwargs):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"libra_model test tried to connect to {address!r}, but model code must stay offline")
        return original_connect_ex(self, address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse_ex)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

