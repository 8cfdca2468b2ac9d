"""Defaults shared by the library and the CLI, in one dependency-free module (so ``--help`` stays fast)."""

DEFAULT_MODEL = "bundled:whisper-base"
DEFAULT_LANGUAGE = "ko"
DEFAULT_TASK = "transcribe"
# Transcription cap: half the decoder's 448 positions, openai/whisper's sample_len.
TRANSCRIBE_MAX_NEW_TOKENS = 224
TRANSCRIBE_BATCH_SIZE = 8
# Scoring (in-training evaluation and `asr-lora eval`): the same cap, batch and reference bound in
# both, so that the dev CER of a checkpoint in metrics.jsonl is what `asr-lora eval` reproduces.
EVAL_MAX_NEW_TOKENS = 128
EVAL_BATCH_SIZE = 16
MAX_DECODER_TOKENS = 444  # 448 positions less the 4 prompt tokens
# Parity checks of merge and export-ct2
PARITY_CLIPS = 32
PARITY_MAX_NEW_TOKENS = 128
