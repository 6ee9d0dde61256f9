"""The precompute flow called directly (a temporary Prefect API, a real Dask LocalCluster)."""

import pandas as pd
import pytest
from imageserver import ImageServer, image_server  # noqa: F401 - the fixture is used by name
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort

from flows.params import ClusterParams, DownloadParams, EncodeParams
from flows.precompute import precompute
from storage_schema import EmbeddingStore


@pytest.mark.slow
def test_precompute_flow_encodes_good_rows_and_skips_finished_shards(prefect_harness, image_server, tmp_path):  # noqa: F811
    good = {image_server.url(f"/img/{i}.png"): f"flow picture {i}" for i in range(5)}
    urls = list(good.items()) + [(image_server.url("/missing/9.jpg"), "gone")]
    pd.DataFrame({"url": [u for u, _ in urls], "caption": [c for _, c in urls]}).to_csv(tmp_path / "u.csv", index=False)
    # Relative paths under base_dir, as the served precompute/local deployment passes them.
    kwargs = dict(urls="u.csv", encoder="tiny-clip", out="out", base_dir=str(tmp_path),
                  download=DownloadParams(image_size=32, processes_count=1, thread_count=4,
                                          number_sample_per_shard=2, timeout=3),
                  encode=EncodeParams(batch_size=2), cluster=ClusterParams(n_workers=1))
    first = precompute(**kwargs)
    assert first["shards_encoded_now"] == 3 and first["store_rows"] == 5
    assert first["store"] == str(tmp_path / "out" / "store")
    with get_client(sync_client=True) as client:  # the run records where it wrote
        key = ArtifactFilter(key=ArtifactFilterKey(any_=["precompute-output"]))
        artifact = client.read_artifacts(artifact_filter=key, sort=ArtifactSort.CREATED_DESC, limit=1)[0]
    assert f"| store | `{tmp_path / 'out' / 'store'}` |" in artifact.data and "| store rows | 5 |" in artifact.data
    assert EmbeddingStore(tmp_path / "out" / "store", verify=True).num_rows == 5
    second = precompute(**kwargs)
    assert second["shards_encoded_now"] == 0 and second["store_rows"] == 5
