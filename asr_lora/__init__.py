"""asr-lora: fine-tune Whisper with (Q)LoRA on Korean speech."""

__version__ = "0.1.0"
