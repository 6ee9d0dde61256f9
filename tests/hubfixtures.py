"""The hub tests' fixtures: a loopback Hugging Face hub (tests/fakehub.py) holding a gated LAION-HighRes and a
cc3m webdataset copy, the real client pointed at it, and LAION-shaped metadata rows."""

import io

import pandas as pd
import pytest

from pipeline.hub import OFFLINE_ENV_VARS


def no_offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in OFFLINE_ENV_VARS:
        monkeypatch.delenv(var, raising=False)


def laion_like(n: int, offset: int, seed: int) -> pd.DataFrame:
    """Rows in LAION-HighRes's column layout; every 5th row violates one filter."""
    import numpy as np

    rng = np.random.default_rng(seed)
    i = np.arange(offset, offset + n)
    df = pd.DataFrame({
        "URL": [f"http://laion/{k}.jpg" for k in i],
        "TEXT": [f"picture number {k}" for k in i],
        "WIDTH": rng.integers(1024, 4000, n).astype(float),
        "HEIGHT": rng.integers(1024, 4000, n).astype(float),
        "similarity": rng.random(n),
        "hash": rng.integers(-(2**62), 2**62, n),
        "punsafe": rng.random(n) * 0.3,
        "pwatermark": rng.random(n) * 0.5,
        "LANGUAGE": ["en"] * n,
    })
    bad = i % 5 == 0
    kinds = (i // 5) % 5
    df.loc[bad & (kinds == 0), "LANGUAGE"] = "de"
    df.loc[bad & (kinds == 1), "punsafe"] = 0.9
    df.loc[bad & (kinds == 2), "pwatermark"] = 0.95
    df.loc[bad & (kinds == 3), "WIDTH"] = 512.0
    df.loc[bad & (kinds == 4), "TEXT"] = "hi"  # shorter than min_caption_chars=5
    return df


LAION = "laion/laion-high-resolution"
TOKEN = "hf_granted_reader"


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory):
    """A loopback hub (tests/fakehub.py, its own process) with a gated LAION-HighRes and a cc3m webdataset copy."""
    from fakehub import FakeHub
    from wdsfixtures import render

    hub = FakeHub(tmp_path_factory.mktemp("hub"), page_size=2)  # 2 entries a page: the listing must paginate
    for i in range(3):  # names as after the restore; nothing like the old part-000NN-5d6701c4 names
        buf = io.BytesIO()
        laion_like(40, 40 * i, i).to_parquet(buf)
        hub.add_file(LAION, f"data/train-{i:05d}-of-00003-restored.parquet", buf.getvalue())
    hub.add_file(LAION, "README.md", b"# LAION-HighRes\n")
    hub.gate(LAION, [TOKEN])
    for t in range(2):  # the real copy's layout: KEY.jpg + KEY.txt, no json, keys unique across tars
        members = {}
        for j in range(3):
            key = f"{t * 3 + j:09d}"
            members[f"{key}.jpg"] = render(10 * t + j)
            if (t, j) != (1, 2):  # one sample without a caption: counted as failed, never encoded
                members[f"{key}.txt"] = f"a picture, number {t * 3 + j}".encode()
        hub.add_file("pixparse/cc3m-wds", f"cc3m-train-{t:04d}.tar", tar_bytes(members))
    hub.add_file("pixparse/cc3m-wds", "cc3m-validation-0000.tar", tar_bytes({"v.jpg": render(99), "v.txt": b"val"}))
    with hub:
        yield hub


def tar_bytes(members: dict[str, bytes]) -> bytes:
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def hf_env(fake_hub, tmp_path, monkeypatch):
    """The client pointed at the fake hub, with an empty cache and no login; returns the login token file."""
    import huggingface_hub.constants

    no_offline_env(monkeypatch)
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    token_file = tmp_path / "hf-home" / "token"  # where `huggingface-cli login` saves the token
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(token_file))
    # huggingface_hub reads HF_HUB_OFFLINE once, at its first import (maybe under another test's setting);
    # our own code reads the variable at each call, which is what these tests set.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    fake_hub.clear_log()
    return token_file


def downloads(hub) -> list[str]:
    return [r for r in hub.requests() if "/resolve/" in r or r.startswith("GET /cdn/")]
