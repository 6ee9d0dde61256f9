"""The real image of a store row, for the report's examples and for FID.

    ImageSource("runs/cc3m/images").get(key, url) -> PIL.Image | None
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from PIL import Image

from pipeline.webdataset import IMAGE_EXTS, tar_samples


class ImageSource:
    """Finds the image of a store row by key: in a folder of webdataset tars (img2dataset's layout:
    KEY.jpg inside shards, the key the encode stage stores), in a folder of files named KEY.<ext>,
    or at the row's url when that is a local path or a file:// url inside that same folder: a row's url
    comes from the data (a stranger's tar can name /home/me/secret.png), so no other local file is opened,
    and without a folder none is."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise FileNotFoundError(f"image source {self.root}: no such folder")
        self._index: dict[str, tuple[Path, str | None]] | None = None

    def _build_index(self) -> dict[str, tuple[Path, str | None]]:
        index: dict[str, tuple[Path, str | None]] = {}
        if self.root is None:
            return index
        for path in sorted(self.root.rglob("*")):
            if path.suffix == ".tar":
                with tarfile.open(path) as tar:
                    for sample in tar_samples(tar):  # the keys the encode stage stored, its refusals left out
                        member = next((sample.members[e] for e in IMAGE_EXTS if e in sample.members), None)
                        if sample.problem is None and member is not None:
                            index.setdefault(sample.key, (path, member.name))
            elif path.suffix.lstrip(".").lower() in IMAGE_EXTS:
                index.setdefault(path.stem, (path, None))
        return index

    def get(self, key: str, url: str | None = None) -> Image.Image | None:
        if self._index is None:
            self._index = self._build_index()
        hit = self._index.get(str(key))
        try:
            if hit is not None:
                path, member = hit
                if member is None:
                    return Image.open(path).convert("RGB")
                with tarfile.open(path) as tar:
                    f = tar.extractfile(member)
                    return Image.open(io.BytesIO(f.read())).convert("RGB") if f is not None else None
            local = self._local(url)
            if local is not None:
                return Image.open(local).convert("RGB")
        except (OSError, Image.DecompressionBombError):  # an unreadable image is shown as missing, not fatal
            return None
        return None

    def _local(self, url: str | None) -> Path | None:
        """The file a local url names, when it lies inside the root (links resolved first), else None."""
        if not url or self.root is None or not (url.startswith("file://") or url.startswith("/")):
            return None
        path = Path(url.removeprefix("file://")).resolve()
        return path if path.is_relative_to(self.root.resolve()) and path.is_file() else None
