"""A chat's workspace: one directory, made on first use, that the file tools cannot leave.

What this sandbox is, honestly: a directory and (for ``execute``) a process group, not a
container. The path checks here protect the file tools (list_files, read_file, write_file,
edit_file, search_files): a path is relative to the workspace, may not use ``..``, and may not
reach outside through a symbolic link, anywhere in it; writes do not follow a link in the last
component (``O_NOFOLLOW``) and check the real parent. The checks and the use are not one atomic
step, so something else changing the workspace at the same moment (only ``execute`` can) could
race them. ``execute`` itself runs as the server's user in the workspace directory: it can read
whatever that user can read and write wherever that user can write; only its environment is
scrubbed, its process group killed when it ends, and its network cut where the platform lets an
unprivileged user do that. Enable it only for models and users you would give that shell to.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath

from chatd.tools.builtin import ToolFailed

_RM = shutil.which("rm") or "/bin/rm"
_CHMOD = shutil.which("chmod") or "/bin/chmod"


@dataclass(frozen=True, slots=True)
class WorkspaceLimits:
    """Every bound of the workspace tools, with its unit in its name; defaulted here only."""

    max_read_bytes: int = 64 * 1024  # text read_file returns (head and tail beyond it)
    max_file_bytes: int = 16 * 1024 * 1024  # files read_file and edit_file will open at all
    max_write_bytes: int = 4 * 1024 * 1024  # content write_file or edit_file may leave
    max_output_bytes: int = 64 * 1024  # search results returned (head and tail beyond it)
    max_list_entries: int = 1000
    max_search_matches: int = 200
    max_search_files: int = 10_000  # files opened by one search
    max_search_file_bytes: int = 1024 * 1024  # scanned per file; the rest is not searched
    max_search_line_bytes: int = 400  # of one matching line shown
    execute_timeout_s: float = 30.0  # the default and the most a call may ask for
    execute_max_output_bytes: int = 64 * 1024  # returned (head and tail beyond it)
    # After the command ends and its group is killed, the wait for output still in the pipe
    # (a child that left the group with setsid could hold it open forever).
    execute_output_grace_s: float = 1.0

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"WorkspaceLimits.{field.name} must be a number above 0")


def relative_path(value: str, *, allow_root: bool) -> PurePosixPath:
    """The path as the model gave it, refused when it could leave the workspace by its spelling
    alone (absolute, ``..``); links are checked against the disk by ``Workspace.resolve``."""
    if "\0" in value:
        raise ToolFailed(f"path {value!r} contains a NUL character")
    path = PurePosixPath(value)
    if path.is_absolute():
        raise ToolFailed(
            f"path {value!r} is absolute: paths are relative to the workspace root"
            " and cannot leave it"
        )
    if ".." in path.parts:
        raise ToolFailed(f"path {value!r} uses '..': paths cannot leave the workspace")
    if not path.parts and not allow_root:
        raise ToolFailed(f"path {value!r} names the workspace root, not a file")
    return path


@dataclass(frozen=True, slots=True)
class Workspace:
    """One chat's directory. Every method blocks on the filesystem: call it in a thread."""

    directory: Path

    def create(self) -> Path:
        """The directory's real path, made (mode 0o700, as is its root) if it is not there."""
        self.directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory.mkdir(mode=0o700, exist_ok=True)
        return Path(os.path.realpath(self.directory))

    def resolve(self, path: PurePosixPath, shown: str) -> Path:
        """The real path of ``path`` (every link followed), refused if that is outside."""
        base = self.create()
        real = Path(os.path.realpath(base / path))
        _refuse_outside(base, real, shown)
        return real

    def resolve_for_write(self, path: PurePosixPath, shown: str, *, make_parents: bool) -> Path:
        """The real parent of ``path`` joined with its last component, which is left for the
        caller to open with ``O_NOFOLLOW`` (a link there is refused, never followed)."""
        base = self.create()
        parent = Path(os.path.realpath(base / path.parent))
        _refuse_outside(base, parent, shown)
        if make_parents:
            try:
                parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise ToolFailed(
                    f"cannot make the folders of {shown!r}: a part of it is a file"
                ) from None
            # The folders just made are plain directories, but the walk to them is re-checked.
            parent = Path(os.path.realpath(parent))
            _refuse_outside(base, parent, shown)
        return parent / path.name

    def remove(self) -> None:
        """Gone with everything in it (links removed, never followed); absent is fine.

        ``rm -rf`` rather than shutil.rmtree, which recurses once per folder level: execute
        can nest folders deeper than Python's recursion limit (or than PATH_MAX).
        """
        if not os.path.lexists(self.directory):
            return
        if _rm_rf(self.directory) is None:
            return
        # execute may have left folders its owner cannot read, write or enter: open them up
        # (chmod -R does not follow links) and try again.
        subprocess.run(
            [_CHMOD, "-R", "u+rwx", "--", str(self.directory)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )
        failure = _rm_rf(self.directory)
        if failure is not None:
            raise OSError(errno.ENOTEMPTY, f"cannot remove workspace {self.directory}: {failure}")


def _rm_rf(directory: Path) -> str | None:
    """None once ``directory`` is gone, else what rm said."""
    done = subprocess.run(
        [_RM, "-rf", "--", str(directory)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )
    if done.returncode == 0 and not os.path.lexists(directory):
        return None
    return done.stderr.decode("utf-8", "replace").strip() or f"rm exited {done.returncode}"


def _refuse_outside(base: Path, real: Path, shown: str) -> None:
    if real != base and base not in real.parents:
        raise ToolFailed(
            f"path {shown!r} leads outside the workspace through a symbolic link: refused"
        )
