"""The file tools over a chat's workspace: list, read, write, edit and search.

Each validates its arguments on the event loop, then does all of its filesystem work in one
worker thread, so a slow disk never stalls other chats. The path rules are ``Workspace``'s.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import os
import re
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import trio

from chatd.tools.arguments import bool_arg, int_arg, text_arg
from chatd.tools.builtin import ToolFailed
from chatd.tools.truncate import clip
from chatd.tools.workspace import Workspace, WorkspaceLimits, relative_path

# O_NONBLOCK: opening a FIFO left in the workspace must fail or return, never hang a thread.
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_WRITE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_UPDATE = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


async def list_files(
    args: Mapping[str, Any], workspace: Workspace, limits: WorkspaceLimits
) -> object:
    shown = text_arg(args, "path", default="")
    path = relative_path(shown, allow_root=True)
    recursive = bool_arg(args, "recursive")
    listing = functools.partial(
        _list, workspace, path, shown, recursive=recursive, max_entries=limits.max_list_entries
    )
    return await trio.to_thread.run_sync(listing)


async def read_file(
    args: Mapping[str, Any], workspace: Workspace, limits: WorkspaceLimits
) -> object:
    shown = text_arg(args, "path")
    path = relative_path(shown, allow_root=False)
    start_line = int_arg(args, "start_line", minimum=1)
    end_line = int_arg(args, "end_line", minimum=1)
    if start_line is not None and end_line is not None and end_line < start_line:
        raise ToolFailed("'end_line' must be at least 'start_line'")
    reading = functools.partial(
        _read, workspace, path, shown, start_line=start_line, end_line=end_line, limits=limits
    )
    return await trio.to_thread.run_sync(reading)


async def write_file(
    args: Mapping[str, Any], workspace: Workspace, limits: WorkspaceLimits
) -> object:
    shown = text_arg(args, "path")
    path = relative_path(shown, allow_root=False)
    data = text_arg(args, "content").encode()
    if len(data) > limits.max_write_bytes:
        raise ToolFailed(
            f"'content' is {len(data)} bytes: write_file writes at most"
            f" {limits.max_write_bytes} bytes"
        )
    return await trio.to_thread.run_sync(_write, workspace, path, shown, data)


async def edit_file(
    args: Mapping[str, Any], workspace: Workspace, limits: WorkspaceLimits
) -> object:
    shown = text_arg(args, "path")
    path = relative_path(shown, allow_root=False)
    old_text = text_arg(args, "old_text")
    if not old_text:
        raise ToolFailed("'old_text' must not be empty")
    new_text = text_arg(args, "new_text")
    replace_all = bool_arg(args, "replace_all")
    editing = functools.partial(
        _edit,
        workspace,
        path,
        shown,
        old_text=old_text,
        new_text=new_text,
        replace_all=replace_all,
        limits=limits,
    )
    return await trio.to_thread.run_sync(editing)


async def search_files(
    args: Mapping[str, Any], workspace: Workspace, limits: WorkspaceLimits
) -> object:
    pattern = text_arg(args, "pattern")
    if not pattern:
        raise ToolFailed("'pattern' must not be empty")
    glob = text_arg(args, "glob", default="")
    flags = re.IGNORECASE if bool_arg(args, "ignore_case") else 0
    try:
        regex = re.compile(pattern, flags)
    except re.error as exc:
        raise ToolFailed(
            f"'pattern' {pattern!r} is not a valid regular expression: {exc}"
        ) from None
    # A pathological pattern can backtrack for ages in a thread nothing can stop; abandoning it
    # at least lets an interrupt end the call.
    return await trio.to_thread.run_sync(
        _search, workspace, regex, glob, limits, abandon_on_cancel=True
    )


# The blocking halves, run in a worker thread.


def _list(
    workspace: Workspace, path: PurePosixPath, shown: str, *, recursive: bool, max_entries: int
) -> object:
    folder = workspace.resolve(path, shown)
    if not folder.is_dir():
        if folder.exists():
            raise ToolFailed(f"{shown!r} is a file, not a folder: read_file reads it")
        raise ToolFailed(f"{shown!r} does not exist")
    entries: list[dict[str, object]] = []
    truncated = False
    for entry, entry_path, kind in _walk(folder, path, recursive=recursive):
        if len(entries) == max_entries:
            truncated = True
            break
        listed: dict[str, object] = {"path": entry_path.as_posix(), "type": kind}
        if kind == "file":
            with contextlib.suppress(OSError):  # removed since it was listed
                listed["size"] = entry.stat(follow_symlinks=False).st_size
        entries.append(listed)
    return {"path": path.as_posix(), "entries": entries, "truncated": truncated}


def _read(
    workspace: Workspace,
    path: PurePosixPath,
    shown: str,
    *,
    start_line: int | None,
    end_line: int | None,
    limits: WorkspaceLimits,
) -> object:
    real = workspace.resolve(path, shown)
    fd = _open(real, _READ, shown)
    try:  # a raw descriptor: a folder opens read-only too, and is refused by name
        text = _read_text(fd, shown, limits.max_file_bytes, "read_file")
    finally:
        os.close(fd)
    lines = _lines(text)
    first = start_line or 1
    if first > max(len(lines), 1):
        raise ToolFailed(
            f"'start_line' {first} is past the end of {shown!r}, which has {len(lines)} lines"
        )
    last = len(lines) if end_line is None else min(end_line, len(lines))
    clipped = clip("".join(lines[first - 1 : last]).encode(), limits.max_read_bytes)
    return {
        "path": shown,
        "text": clipped.text,
        "total_lines": len(lines),
        "start_line": first,
        "end_line": last,
        "truncated": clipped.cut_bytes > 0,
    }


def _write(workspace: Workspace, path: PurePosixPath, shown: str, data: bytes) -> object:
    target = workspace.resolve_for_write(path, shown, make_parents=True)
    existed = os.path.lexists(target)
    fd = _open(target, _WRITE, shown)
    with os.fdopen(fd, "wb") as file:
        _refuse_irregular(file.fileno(), shown)
        file.write(data)
    return {"path": shown, "bytes_written": len(data), "created": not existed}


def _edit(
    workspace: Workspace,
    path: PurePosixPath,
    shown: str,
    *,
    old_text: str,
    new_text: str,
    replace_all: bool,
    limits: WorkspaceLimits,
) -> object:
    target = workspace.resolve_for_write(path, shown, make_parents=False)
    fd = _open(target, _UPDATE, shown)
    with os.fdopen(fd, "r+b") as file:
        text = _read_text(file.fileno(), shown, limits.max_file_bytes, "edit_file")
        count = text.count(old_text)
        if count == 0:
            raise ToolFailed(
                f"'old_text' was not found in {shown!r} (it must match exactly,"
                " whitespace included)"
            )
        if count > 1 and not replace_all:
            raise ToolFailed(
                f"'old_text' matches {count} times in {shown!r}: include more of the"
                " surrounding text to make it unique, or set 'replace_all' to replace all"
            )
        edited = text.replace(old_text, new_text, -1 if replace_all else 1).encode()
        if len(edited) > limits.max_write_bytes:
            raise ToolFailed(
                f"the edited {shown!r} would be {len(edited)} bytes: files are written up to"
                f" {limits.max_write_bytes} bytes"
            )
        file.seek(0)
        file.truncate()
        file.write(edited)
    return {"path": shown, "replacements": count if replace_all else 1}


def _search(
    workspace: Workspace, regex: re.Pattern[str], glob: str, limits: WorkspaceLimits
) -> object:
    base = workspace.create()
    found: list[str] = []
    searched = binary = partly = 0
    truncated = False
    for _entry, path, kind in _walk(base, PurePosixPath(), recursive=True):
        if kind != "file" or (glob and not fnmatch.fnmatchcase(path.as_posix(), glob)):
            continue
        if len(found) == limits.max_search_matches:
            break
        if searched == limits.max_search_files:
            truncated = True
            break
        try:
            fd = os.open(base / path, _READ)
        except OSError:
            continue  # removed, or not readable: nothing to report on it
        try:
            data = _read_up_to(fd, limits.max_search_file_bytes + 1)
        finally:
            os.close(fd)
        searched += 1
        if len(data) > limits.max_search_file_bytes:
            partly += 1
            data = data[: limits.max_search_file_bytes]
        if b"\0" in data:
            binary += 1
            continue
        for number, line in enumerate(data.decode("utf-8", "replace").split("\n"), 1):
            if regex.search(line):
                shown = clip(line.rstrip("\r").encode(), limits.max_search_line_bytes).text
                found.append(f"{path.as_posix()}:{number}:{shown}")
                if len(found) == limits.max_search_matches:
                    truncated = True
                    break
    clipped = clip("\n".join(found).encode(), limits.max_output_bytes)
    return {
        "matches": clipped.text,
        "match_count": len(found),
        "truncated": truncated or clipped.cut_bytes > 0,
        "files_searched": searched,
        "binary_files_skipped": binary,
        # Only their first max_search_file_bytes were searched.
        "files_partly_searched": partly,
    }


# Shared by the blocking halves.


def _open(path: Path, flags: int, shown: str) -> int:
    """The file descriptor, or a refusal that says what is wrong in the model's terms."""
    try:
        return os.open(path, flags, 0o644)
    except FileNotFoundError:
        raise ToolFailed(f"{shown!r} does not exist") from None
    except IsADirectoryError:
        raise ToolFailed(f"{shown!r} is a folder, not a file") from None
    except NotADirectoryError:
        raise ToolFailed(f"a part of {shown!r} is a file, not a folder") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ToolFailed(
                f"{shown!r} is a symbolic link: the file tools do not write through links"
            ) from None
        raise


def _refuse_irregular(fd: int, shown: str) -> os.stat_result:
    status = os.fstat(fd)
    if stat.S_ISDIR(status.st_mode):
        raise ToolFailed(f"{shown!r} is a folder, not a file: list_files lists it")
    if not stat.S_ISREG(status.st_mode):
        raise ToolFailed(f"{shown!r} is not a regular file")
    return status


def _read_text(fd: int, shown: str, max_bytes: int, tool: str) -> str:
    size = _refuse_irregular(fd, shown).st_size
    data = _read_up_to(fd, max_bytes + 1) if size <= max_bytes else b""
    if size > max_bytes or len(data) > max_bytes:
        raise ToolFailed(
            f"{shown!r} is {max(size, len(data))} bytes: {tool} opens files up to"
            f" {max_bytes} bytes (search_files can search it)"
        )
    if b"\0" in data:
        raise ToolFailed(
            f"{shown!r} is a binary file (it contains NUL bytes): only UTF-8 text can be read"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ToolFailed(
            f"{shown!r} is not UTF-8 text (byte {exc.start} is invalid): binary files"
            " cannot be read"
        ) from None


def _read_up_to(fd: int, count: int) -> bytes:
    """The first ``count`` bytes, or all if fewer: one read(2) may return less than asked."""
    chunks: list[bytes] = []
    while count > 0 and (chunk := os.read(fd, count)):
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def _lines(text: str) -> list[str]:
    """Each line with its own ``\\n`` (the last may lack one); only ``\\n`` ends a line, so
    the numbers agree with search_files and with ``wc -l``-style tools."""
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _walk(
    folder: Path, path: PurePosixPath, *, recursive: bool
) -> Iterator[tuple[os.DirEntry[str], PurePosixPath, str]]:
    """Entries sorted by name, depth first, links never followed; a loop with a stack, not
    recursion, so no nesting depth can exhaust Python's. A sub-folder that cannot be read
    is listed but not entered."""
    stack = [_children(folder, path)]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        entry, entry_path = item
        kind = _kind(entry)
        yield entry, entry_path, kind
        if recursive and kind == "dir":
            with contextlib.suppress(OSError):
                stack.append(_children(Path(entry.path), entry_path))


def _children(
    folder: Path, path: PurePosixPath
) -> Iterator[tuple[os.DirEntry[str], PurePosixPath]]:
    with os.scandir(folder) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    return iter([(entry, path / entry.name) for entry in entries])


def _kind(entry: os.DirEntry[str]) -> str:
    try:
        if entry.is_symlink():
            return "symlink"
        if entry.is_dir(follow_symlinks=False):
            return "dir"
        if entry.is_file(follow_symlinks=False):
            return "file"
    except OSError:
        pass
    return "other"
