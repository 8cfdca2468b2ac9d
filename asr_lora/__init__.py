"""asr-lora: fine-tune Whisper with (Q)LoRA on Korean speech."""

import logging as _logging

__version__ = "0.1.0"


class _DropKernelsNotice(_logging.Filter):
    """bitsandbytes' CPU backend logs a warning at import when the optional hub package ``kernels``
    is missing ("Failed to load CPU gemm_4bit_forward from kernels-community"). Nothing is wrong and
    nothing is for the user to do (``kernels`` downloads code from a hub): drop that one record."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "kernels-community" not in str(record.msg)


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropKernelsNotice())
