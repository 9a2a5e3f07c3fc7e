"""Image paths read from the data stay inside the data root.

A path in a Karpathy JSON, a metadata file or a path column is data, not a trusted instruction: an
absolute path, ``../`` or a symlink could make training read (and draw into an uploaded figure)
any file of the machine. Every such path is resolved with ``os.path.realpath`` and refused, before
anything reads it, unless it lies inside the data root: ``image_root`` when given, else the folder
of the data file or folder (for a Hub dataset: the caches its files are downloaded to).
"""

from __future__ import annotations

import os

OUTSIDE_DATA_ROOT = "outside the data root"


class DataRoot:
    """Where the image paths of one data source may point.

    Args:
        folder: the folder relative paths are relative to, and that every path must resolve
            inside; ``None`` where there is none (a Hub dataset without ``image_root``).
        also_inside: further folders paths may resolve into (the Hub caches).
        allow_outside: accept paths that resolve anywhere (an explicit user choice).
    """

    def __init__(self, folder: str | None, also_inside: tuple[str, ...] = (), allow_outside: bool = False):
        self.folder = None if folder is None else os.path.abspath(folder)
        roots = ((self.folder,) if self.folder is not None else ()) + tuple(also_inside)
        self.real_roots = tuple(os.path.realpath(root) for root in roots)
        self.allow_outside = allow_outside

    def locate(self, path: str) -> tuple[str, str | None]:
        """``(shown, real)``: the path as written, joined to the folder (for messages), and the
        real path to read, or ``None`` when it resolves outside the root and that is not allowed."""
        shown = path if os.path.isabs(path) or self.folder is None else os.path.join(self.folder, path)
        real = os.path.realpath(shown)
        if self.allow_outside or any(_is_inside(real, root) for root in self.real_roots):
            return shown, real
        return shown, None


def _is_inside(real_path: str, real_root: str) -> bool:
    return os.path.commonpath([real_path, real_root]) == real_root
