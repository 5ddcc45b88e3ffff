"""Warnings before training: a GPU-sized config started on a machine that would train it
on the CPU is named, with the time it would take and what to do instead."""

from __future__ import annotations

from engine.config import load_preset
from engine.preflight import cpu_warning


def test_a_gpu_preset_on_the_cpu_is_warned_about_and_the_cpu_preset_is_not():
    home = load_preset("home-8gb")
    text = cpu_warning(home, "cpu", step_seconds=60.0)
    assert text.startswith("this config is sized for a GPU") and "139 days" in text
    assert "Use the tiny-cpu preset" in text and "200,000" in text
    assert cpu_warning(home, "cuda", step_seconds=60.0) == ""
    assert cpu_warning(load_preset("tiny-cpu"), "cpu") == ""          # measured here
    assert cpu_warning(home, "cpu") != ""                             # measured here
