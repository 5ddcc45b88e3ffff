"""The studio page: the engine version, the workspace and the presets with their model sizes."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

import engine
from engine import config

PRESET_HEADERS = ["Preset", "Model size", "Description"]


def model_size_text(m: config.ModelConfig) -> str:
    """One line naming the size row and the network's shape, e.g. 'tiny: width 128, ...'."""
    row = m.size or "custom"
    return (f"{row}: width {m.hidden_dim}, {m.patch_layers} patch + {m.pixel_layers} pixel "
            f"blocks, patch {m.patch_size} px")


def preset_rows() -> list[list[str]]:
    """One row per preset in presets/; a preset that fails validation shows its error."""
    rows = []
    for name in config.list_presets():
        try:
            cfg = config.load_preset(name)
        except config.ConfigError as e:
            rows.append([name, "", f"invalid preset: {e}"])
            continue
        rows.append([name, model_size_text(cfg.model), cfg.description])
    return rows


def build_ui(workspace: Path) -> gr.Blocks:
    """The studio as a Blocks app; the caller launches it."""
    with gr.Blocks(title="PixelHDM Studio") as demo:
        gr.Markdown(f"# PixelHDM Studio\n\nEngine {engine.__version__} · workspace "
                    f"`{Path(workspace)}`")
        gr.Dataframe(value=preset_rows(), headers=PRESET_HEADERS, label="Presets",
                     interactive=False, wrap=True, column_widths=["15%", "30%", "55%"])
    return demo
