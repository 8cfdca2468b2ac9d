"""Atomic writes: a file or a folder is either complete under its name or not there at all.

Two shapes, used everywhere something is written:

* a file is written to a hidden ``.<name>.partial`` sibling and renamed over the target
  (:func:`atomic_file`, :func:`write_text_atomic`, :func:`write_json_atomic`);
* a folder is built in a hidden temporary sibling (:func:`staged_folder`) and renamed into place
  (:func:`replace_dir` keeps one complete copy at every moment, even when replacing), or, for
  outputs that must pass a check first, moved to ``<name>.failed`` with only its report
  (:func:`finish_or_failed`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def partial_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open ``path`` for writing through a ``.partial`` sibling, renamed over ``path`` on success
    and removed on any error."""
    path = Path(path)
    tmp = partial_path(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as fh:
        fh.write(text)


def write_json_atomic(path: str | os.PathLike, data, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


@contextmanager
def staged_folder(target: str | os.PathLike) -> Iterator[Path]:
    """A hidden temporary sibling of ``target`` (so renaming it into place is atomic) with the usual
    permissions rather than mkdtemp's owner-only ones; removed if the block raises. The block
    renames it into place itself (:func:`replace_dir`, :func:`finish_or_failed`, ``os.rename``)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``, replacing it: at every moment one complete copy exists under
    ``dst`` or ``.<dst>.old`` (which :func:`restore_replaced` puts back after a kill)."""
    old = dst.with_name(f".{dst.name}.old")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def restore_replaced(old: Path) -> str:
    """After a kill during :func:`replace_dir`: drop ``.<name>.old`` if ``<name>`` exists, else put it
    back; returns what was done, for the log."""
    live = old.with_name(old.name[1:-len(".old")])
    if live.exists():
        shutil.rmtree(old, ignore_errors=True)
        return f"removed a replaced folder left by an interrupted run: {old.name}"
    os.rename(old, live)
    return f"restored {live.name}/ from {old.name} (an interrupted run was replacing it)"


def remove_dir(path: Path) -> None:
    """Delete a folder so that a kill half-way never leaves it partial under its name: rename it to a
    hidden temporary first."""
    doomed = path.with_name(f".{path.name}.tmp-delete")
    shutil.rmtree(doomed, ignore_errors=True)
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def fsync_files(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def finish_or_failed(work: Path, out: Path, report: dict, report_name: str, heavy: tuple[str, ...]) -> None:
    """End a checked output: write ``report`` into ``work``, then rename ``work`` to ``out`` if
    ``report["passed"]``; else keep only the report (and light files) in ``<out>.failed``."""
    write_json_atomic(work / report_name, report)
    if report["passed"]:
        if out.is_dir():
            out.rmdir()  # empty (checked before the work started)
        os.rename(work, out)
        return
    failed = out.with_name(out.name + ".failed")
    shutil.rmtree(failed, ignore_errors=True)
    for name in heavy:  # weights that failed the check are not worth the disk
        for path in work.glob(name):
            path.unlink()
    os.rename(work, failed)
