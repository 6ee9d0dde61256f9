"""Every deployment of the project, and `serve` for running them all on one machine.

`eclipse-prior serve` registers these with the Prefect server at PREFECT_API_URL and runs
them in a single `prefect.serve(...)` process. For many machines, `prefect.yaml` at the
repository root deploys the same flows to a work pool instead.
"""

from pathlib import Path

from prefect.deployments.runner import EntrypointType

from flows.precompute import precompute

# Dataset presets get their own precompute deployment; the encoder is the decoder's own.
DATASET_DEPLOYMENTS = {
    "laion-highres-5m": "kandinsky22",  # the paper's Kandinsky setting
    "mscoco": "kandinsky22",
    "cc3m": "kandinsky22",
    "cc12m": "kandinsky22",
}


def build_deployments(data_dir: str | Path = "runs", dask_address: str | None = None) -> list:
    data = Path(data_dir).absolute()
    cluster = {"address": dask_address} if dask_address else {}
    common = {"entrypoint_type": EntrypointType.MODULE_PATH}  # found via the installed package, not the cwd
    deployments = [
        precompute.to_deployment(
            name, parameters={"urls": name, "encoder": encoder, "out": str(data / name), "cluster": cluster},
            description=f"Download {name} and encode it with the {encoder} encoders into {data / name}/store.",
            tags=["precompute", name], **common,
        )
        for name, encoder in DATASET_DEPLOYMENTS.items()
    ]
    deployments.append(precompute.to_deployment(
        "local", parameters={"cluster": cluster} if cluster else {},
        description="Any local url list: parameters urls (file or folder), encoder (preset or folder), out.",
        tags=["precompute", "local"], **common,
    ))
    return deployments


def serve(data_dir: str | Path = "runs", dask_address: str | None = None, limit: int | None = None) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(*build_deployments(data_dir, dask_address), limit=limit)
