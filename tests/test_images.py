"""Finding a store row's real image: webdataset tars, a folder of files, or a local url."""

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from evaluation.images import ImageSource


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format="PNG")
    return buf.getvalue()


def test_image_source_reads_tars_folders_and_file_urls(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tar:  # img2dataset's layout: KEY.png beside KEY.txt
        for name, data in (("000000001.png", _png((255, 0, 0))), ("000000001.txt", b"a red square")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    src = ImageSource(shards)
    assert np.asarray(src.get("000000001"))[0, 0].tolist() == [255, 0, 0]
    assert src.get("no-such-key") is None
    Image.new("RGB", (4, 4), (0, 0, 255)).save(tmp_path / "k1.png")
    assert np.asarray(ImageSource(tmp_path).get("k1"))[0, 0].tolist() == [0, 0, 255]
    assert ImageSource(tmp_path).get("x", url=f"file://{tmp_path / 'k1.png'}").size == (4, 4)
    assert ImageSource(tmp_path).get("x", url=str(tmp_path / "k1.png")).size == (4, 4)
    assert ImageSource().get("x", url="http://example.com/k1.png") is None  # never fetched
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    assert ImageSource(tmp_path).get("broken") is None  # shown as missing, not fatal
    with pytest.raises(FileNotFoundError):
        ImageSource(tmp_path / "nope")


def test_a_rows_url_opens_no_local_file_outside_the_folder_the_user_named(tmp_path):
    """A row's url comes from the data: it must not pull /home/me/secret.png into a report."""
    outside = tmp_path / "home"
    outside.mkdir()
    Image.new("RGB", (4, 4), (0, 255, 0)).save(outside / "secret.png")
    named = tmp_path / "images"
    named.mkdir()
    (named / "link.png").symlink_to(outside / "secret.png")  # a link inside the folder, to a file outside it
    for url in (f"file://{outside / 'secret.png'}", str(outside / "secret.png"),
                f"file://{named}/../home/secret.png", str(named / "link.png")):
        assert ImageSource(named).get("x", url=url) is None, url
        assert ImageSource().get("x", url=url) is None, url  # no folder named: no local file at all
