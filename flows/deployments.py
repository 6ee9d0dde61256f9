"""Every deployment of the project, and `serve` for running them all on one machine.

`eclipse-prior serve` registers these with the Prefect server at PREFECT_API_URL and runs
them in a single `prefect.serve(...)` process. For many machines, `prefect.yaml` at the
repository root deploys the same flows to a work pool instead.
"""

from pathlib import Path

from prefect.deployments.runner import EntrypointType

from flows.evaluate import evaluate
from flows.params import DATASET_DEPLOYMENTS, DECODER_STORES
from flows.precompute import precompute
from flows.reproduce import ReproduceParams, reproduce
from flows.retrain import retrain
from flows.train import train

RETRAIN_CRON = "0 3 * * 0"  # Sundays 03:00: pick up the week's new shards


def build_deployments(data_dir: str | Path = "runs", dask_address: str | None = None) -> list:
    data = Path(data_dir).absolute()
    cluster = {"address": dask_address} if dask_address else {}
    common = {"entrypoint_type": EntrypointType.MODULE_PATH}  # found via the installed package, not the cwd
    deployments = [
        precompute.to_deployment(
            name, parameters={"urls": dataset, "encoder": encoder, "out": str(data / name), "cluster": cluster},
            description=f"Download {dataset} and encode it with the {encoder} encoders into {data / name}/store.",
            tags=["precompute", name], **common,
        )
        for name, (dataset, encoder) in DATASET_DEPLOYMENTS.items()
    ]
    # Relative urls/out resolve under the data folder, not the serve process's cwd (which the user
    # running `prefect deployment run` cannot see); the run logs and records where it wrote.
    deployments.append(precompute.to_deployment(
        "local", parameters={"base_dir": str(data), **({"cluster": cluster} if cluster else {})},
        description=f"Any local url list: parameters urls (file or folder), encoder (preset or folder), out; "
                    f"relative paths are taken under {data}.",
        tags=["precompute", "local"], **common,
    ))
    for decoder, dataset in DECODER_STORES.items():
        store = str(data / dataset / "store")
        deployments += [
            train.to_deployment(
                decoder, parameters={"store": store, "out": str(data / "runs" / f"{decoder}-eclipse"),
                                     "preset": decoder, "objective": "eclipse"},
                description=f"Train an ECLIPSE prior for the {decoder} decoder (the paper's recipe) on {store}.",
                tags=["train", decoder], **common,
            ),
            evaluate.to_deployment(
                decoder, parameters={"priors": [str(data / "runs" / f"{decoder}-eclipse")], "store": store,
                                     "out": str(data / "evaluations" / decoder)},
                description=f"Evaluate {decoder} priors on the held-out split of {store}.",
                tags=["evaluate", decoder], **common,
            ),
            retrain.to_deployment(
                decoder, cron=RETRAIN_CRON,
                parameters={"store": store, "registry": str(data / "registry" / decoder), "preset": decoder},
                description=f"Weekly: continue the promoted {decoder} prior on new shards; promote if not worse.",
                tags=["retrain", decoder], **common,
            ),
        ]
    paper = ReproduceParams.paper().model_dump() | ({"cluster": cluster} if cluster else {})
    deployments += [
        reproduce.to_deployment(
            "paper", parameters={"out": str(data / "reproduce" / "paper"), "params": paper},
            description="The paper's Table 2 grid: its datasets x decoders x projection/eclipse/diffusion, 60k steps "
                        "x 1024, with a cost plan first (needs GPUs and the Hugging Face hub).",
            tags=["reproduce", "paper"], **common,
        ),
        reproduce.to_deployment(
            "world", parameters={"out": str(data / "reproduce" / "world"),
                                 "params": ReproduceParams.rehearsal().model_dump()},
            description="The CPU rehearsal of the grid on the demo's synthetic world: 1.5k and 12k held-in rows, "
                        "three objectives, three seeds (BENCHMARKS.md has its time and results).",
            tags=["reproduce", "world"], **common,
        ),
    ]
    return deployments


def serve(data_dir: str | Path = "runs", dask_address: str | None = None, limit: int | None = None) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(*build_deployments(data_dir, dask_address), limit=limit)
