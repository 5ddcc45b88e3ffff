"""PixelHDM Studio: the Gradio interface over the engine. Imports engine, never the reverse."""
