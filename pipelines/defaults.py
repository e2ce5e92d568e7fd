"""Default model names and settings, in a module light enough for the CLI to import at start-up."""

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
PIXEL_VAE = "pixel"  # identity "VAE": pixels scaled to [-1, 1], for tiny runs
PIXEL_VIDEO_VAE = "pixel-video"  # its video form: first frame alone, then every 4 frames packed into channels
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_T5 = "google/flan-t5-xxl"
DEFAULT_T5_MAX_LENGTH = 120  # as PixArt-alpha
DEFAULT_LLM_MAX_LENGTH = 300  # LLM tokens kept per caption, as Sana with Gemma
DEFAULT_CLIP_LAYER = -1  # CLIP's last hidden states (after its final norm)
DEFAULT_LLM_LAYER = -1  # the LLM's last hidden states (after its final norm)
DEFAULT_MFG_SCALE = 1.1  # motion guidance for videos; the paper found 1.0-1.3 best
