"""PixelHDM engine: a pixel-space dual-path diffusion transformer and everything to
train and sample it, in pure PyTorch. Never imports gradio or the studio."""

__version__ = "0.1.0"
