"""The trainer: config, learning, refusal, checkpoints, exact resume (also after SIGKILL), torchrun."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from storefixtures import write_synthetic_store

from cli.main import main as cli_main
from storage_schema import StoreError
from training.config import TrainConfig, cli_config, load_config
from training.data import is_heldout
from training.export import COMPLETE, latest_checkpoint
from training.prior import PriorTransformer, load_prior
from training.trainer import param_groups, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store32")
    write_synthetic_store(path, rows=256, dim=32, shards=4, seed=0)
    return path


def tiny(store: Path, out: Path, **kw) -> TrainConfig:
    """A fast CPU config: the tiny preset, one thread per process (2 shared cores), no progress bar."""
    base = dict(store=str(store), out=str(out), preset="tiny", objective="projection", steps=30, batch_size=32,
                lr=2e-3, heldout_fraction=0.0, log_every=1, ckpt_every=10, num_threads=1, progress=False)
    return TrainConfig(**(base | kw))


def losses(run: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run / "logs" / "train.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["type"] == "train"}


def test_tiny_prior_overfits_a_tiny_store(tmp_path, store):
    """150 steps of the projection objective on 256 rows: the training MSE falls more than 5x.

    Measured (seeds 0-2): mean MSE over the first 5 steps 0.85-0.99, over the last 5 steps
    0.08-0.10, a drop of 9-12x."""
    run = train(tiny(store, tmp_path / "run", steps=150, ckpt_every=1000))
    curve = losses(tmp_path / "run")
    first = sum(curve[s] for s in range(1, 6)) / 5
    last = sum(curve[s] for s in range(146, 151)) / 5
    assert last < first / 5, (first, last)
    assert isinstance(load_prior(run), PriorTransformer)


def test_eclipse_objective_trains_and_logs_both_terms(tmp_path, store):
    # The synthetic store maps text to image by a random linear map, so its pairs are not aligned in
    # cosine: with L_proj averaged over D (the default) lambda 0.2 trains both terms (summed, InfoNCE stays flat).
    train(tiny(store, tmp_path / "run", objective="eclipse", steps=40, log_every=20, heldout_fraction=0.1,
               eval_batches=2, eclipse_lambda=0.2))
    recs = [json.loads(line) for line in (tmp_path / "run" / "logs" / "train.jsonl").read_text().splitlines()]
    first, last = recs[0], [r for r in recs if r["type"] == "train"][-1]
    terms = {"loss_proj", "loss_cls", "loss_cls_weighted", "grad_ratio_cls_proj"}
    assert terms | {"lr", "grad_norm", "samples_per_s"} <= set(first)
    assert last["loss_cls"] < first["loss_cls"] and last["loss_proj"] < first["loss_proj"]
    assert last["loss"] < first["loss"]
    for r in (first, last):  # window means: the loss is the sum of the two terms of Eq. 5
        assert r["loss"] == pytest.approx(r["loss_proj"] + r["loss_cls_weighted"], rel=1e-5)
        assert r["loss_cls_weighted"] == pytest.approx(0.2 * r["loss_cls"], rel=1e-5)
        assert 0 < r["grad_ratio_cls_proj"] < math.inf
    evals = [r for r in recs if r["type"] == "eval"]
    heldout = sum(int(is_heldout(list(pd.read_parquet(p, columns=["key"])["key"]), 0.1, 0).sum())
                  for p in store.glob("shard-*.parquet"))
    assert [(e["step"], e["rows"]) for e in evals] == [(40, min(heldout, 2 * 32))]  # at the end, 2 batches at most
    assert list((tmp_path / "run" / "logs" / "tb").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(tmp_path / "run" / "logs" / "tb")).Reload()
    assert {f"train/{k}" for k in terms} <= set(tb.Tags()["scalars"])
    assert [e.step for e in tb.Scalars("train/grad_ratio_cls_proj")] == [20, 40]
    assert tb.Scalars("train/grad_ratio_cls_proj")[0].value == pytest.approx(first["grad_ratio_cls_proj"], rel=1e-6)


def records(run: Path, kind: str = "train") -> list[dict]:
    recs = [json.loads(line) for line in (run / "logs" / "train.jsonl").read_text().splitlines()]
    return [r for r in recs if r["type"] == kind]


def test_measuring_the_grad_ratio_leaves_the_update_bit_identical(tmp_path, store, monkeypatch):
    """The measurement runs at every step here (log_every 1): the weights after 8 steps, and every
    logged loss, are exactly those of a run that does not measure."""
    cfg = dict(objective="eclipse", steps=8, eclipse_lambda=2.0, ckpt_every=100)
    train(tiny(store, tmp_path / "measured", **cfg))
    assert len([r for r in records(tmp_path / "measured") if "grad_ratio_cls_proj" in r]) == 8
    monkeypatch.setattr("training.trainer._measure_balance", lambda run, parts: None)
    train(tiny(store, tmp_path / "plain", **cfg))
    assert not any("grad_ratio_cls_proj" in r for r in records(tmp_path / "plain"))
    a = load_prior(tmp_path / "measured" / "prior").state_dict()
    b = load_prior(tmp_path / "plain" / "prior").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "measured") == losses(tmp_path / "plain")


def test_a_run_whose_balance_is_off_either_way_is_warned_about_once(tmp_path, store, capsys):
    """D = 32, Eq. 3 summed: at lambda 0.02 the ratio is ~0.003 from the start (warned "low", once, at the
    end of the first 10 % of the steps); at lambda 2 it is 100x that, the same batch and weights at
    step 1 (the ratio is linear in lambda), and nothing is said. The second run uses bf16 autocast.
    The default mean over D weighs the contrastive term D = 32 times more: at lambda 50 it swamps
    L_proj (warned "high")."""
    low, mid, high = tmp_path / "low", tmp_path / "mid", tmp_path / "high"
    train(tiny(store, low, objective="eclipse", steps=20, eclipse_lambda=0.02, ckpt_every=100, proj_reduction="sum"))
    err = capsys.readouterr().err
    warned = records(low, "warning")
    assert [w["step"] for w in warned] == [2]  # ceil(10 % of 20): measured at steps 1 and 2, then once
    ratios = [r["grad_ratio_cls_proj"] for r in records(low)]
    assert max(ratios[:2]) < 0.01
    text = warned[0]["message"]
    assert "lambda = 0.02" in text and "D = 32" in text and f"last {ratios[1]:.2g}" in text
    assert "eclipse_lambda ~" in text and "summed over D" in text
    assert err.count("warning: the contrastive term is doing next to nothing") == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(low / "logs" / "tb"), size_guidance={"tensors": 0}).Reload()
    assert "warning/text_summary" in tb.Tags()["tensors"]

    train(tiny(store, mid, objective="eclipse", steps=20, eclipse_lambda=2.0, ckpt_every=100, precision="bf16",
               proj_reduction="sum"))
    assert "warning:" not in capsys.readouterr().err and not records(mid, "warning")
    first_mid = records(mid)[0]["grad_ratio_cls_proj"]
    assert first_mid == pytest.approx(100 * ratios[0], rel=0.1)  # bf16 vs fp32
    assert first_mid > 0.01

    train(tiny(store, high, objective="eclipse", steps=20, eclipse_lambda=50.0, ckpt_every=100))
    warned = records(high, "warning")
    assert [w["step"] for w in warned] == [2] and min(r["grad_ratio_cls_proj"] for r in records(high)[:2]) > 10
    assert "swamps the projection term" in warned[0]["message"] and "averaged over D" in warned[0]["message"]
    assert capsys.readouterr().err.count("warning: the contrastive term swamps") == 1


def test_a_non_finite_loss_stops_the_run_and_says_where_to_look(tmp_path, monkeypatch):
    """A NaN in the store (written before the writer refused them, or a damaged shard) must not train on into an
    exported prior of NaNs: the run stops at the step that saw it and names what to check."""
    from storefixtures import random_rows, tiny_info

    import storage_schema.writer as writer
    from storage_schema import StoreWriter, build_table

    info = tiny_info(dim=32, hidden=32)
    rows = random_rows(64, info)
    rows["image_embeds"] = np.array(rows["image_embeds"], dtype=np.float32)
    rows["image_embeds"][5] = np.nan
    monkeypatch.setattr(writer, "_refuse_non_finite", lambda *a: None)  # an older writer
    StoreWriter(tmp_path / "s", info).write_shard("00000", build_table(info, **rows))
    # the reader refuses the batch holding it, naming the shard and row
    with pytest.raises(StoreError, match=r"is corrupt: shard 00000.parquet, row\(s\) 5 .*image_embed"):
        train(tiny(tmp_path / "s", tmp_path / "run-1", steps=8, batch_size=16, objective="eclipse"))
    assert not (tmp_path / "run-1" / "prior").exists()
    # and were a NaN to get past the reader (its value check off here), the loss check stops the run
    import storage_schema.reader as reader

    monkeypatch.setattr(reader, "_outside_range", lambda values: False)
    with pytest.raises(FloatingPointError, match=r"step \d+: loss is nan.*stopping.*store inspect"):
        train(tiny(tmp_path / "s", tmp_path / "run-2", steps=8, batch_size=16, objective="eclipse"))
    assert not (tmp_path / "run-2" / "prior").exists()


def test_projection_logs_its_one_term_and_no_ratio(tmp_path, store):
    train(tiny(store, tmp_path / "run", steps=3))
    first = records(tmp_path / "run")[0]
    assert first["loss_proj"] == first["loss"] and "grad_ratio_cls_proj" not in first


def test_lr_follows_one_cosine_cycle_over_the_run(tmp_path, store):
    """CosineAnnealingWarmRestarts with T_0 = steps, stepped per iteration; the log shows the rate each step used."""
    run = tmp_path / "run"
    train(tiny(store, run, steps=10, lr=1e-3))
    recs = [json.loads(line) for line in (run / "logs" / "train.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in recs if r["type"] == "train"}
    assert lrs == pytest.approx({s: 1e-3 * (1 + math.cos(math.pi * (s - 1) / 10)) / 2 for s in range(1, 11)})


def test_param_groups_decay_matrices_only_and_skip_frozen_parameters():
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    model[0].weight.requires_grad_(False)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert [tuple(p.shape) for p in decay["params"]] == [(3, 4)]  # the Linear's weight; the frozen embedding is out
    assert [tuple(p.shape) for p in no_decay["params"]] == [(3,), (3,), (3,)]  # Linear bias, LayerNorm gain and bias


def test_store_of_another_width_is_refused_before_training(tmp_path):
    write_synthetic_store(tmp_path / "s24", rows=8, dim=24, shards=1)
    with pytest.raises(StoreError, match=r"does not fit the 'karlo' prior \(D=768\).*D=24") as refused:
        train(tiny(tmp_path / "s24", tmp_path / "run", preset="karlo"))
    assert not (tmp_path / "run").exists()  # refused before anything was written
    # ... and the error says what to train instead, which then trains
    fix = "--preset tiny --set embedding_dim=24 --set text_length="
    assert fix in str(refused.value)
    length = int(str(refused.value).split(fix)[1].split()[0])
    train(tiny(tmp_path / "s24", tmp_path / "fixed", preset="tiny", embedding_dim=24, text_length=length, steps=2,
               batch_size=4))
    code = cli_main(["train", "--store", str(tmp_path / "s24"), "--preset", "kandinsky22", "--out",
                     str(tmp_path / "run2"), "--steps", "1"])
    assert code == 1 and not (tmp_path / "run2").exists()
    # Naming no preset: the prior the store's D fits, saved in the run's config (a resume trains the same one).
    code = cli_main(["train", "--store", str(tmp_path / "s24"), "--out", str(tmp_path / "auto"), "--steps", "2",
                     "--batch-size", "4", "--objective", "projection", "--log-every", "1"])
    assert code == 0
    saved = json.loads((tmp_path / "auto" / "train_config.json").read_text())
    assert (saved["preset"], saved["embedding_dim"], saved["text_length"]) == ("tiny", 24, length)
    assert load_prior(tmp_path / "auto" / "prior").config.embedding_dim == 24


def test_checkpoints_are_atomic_complete_and_weights_only_loadable(tmp_path, store):
    run = tmp_path / "run"
    train(tiny(store, run, steps=30, ckpt_every=10, keep_checkpoints=2, ema_decay=0.9))
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000020", "step_00000030"]  # older ones pruned
    latest = latest_checkpoint(run)
    assert latest.name == "step_00000030" and (latest / COMPLETE).exists()
    state = torch.load(latest / "trainer_state.pt", weights_only=True)
    assert state["scheduler"]["last_epoch"] == 30 and len(state["rng"]) == 1  # one rank
    # AdamW's groups: decay on matrices, none on biases and norm gains (training.trainer.param_groups).
    assert [g["weight_decay"] for g in state["optimizer"]["param_groups"]] == [0.01, 0.0]
    meta = json.loads((latest / "state.json").read_text())
    assert meta["step"] == 30 and meta["positions"] and meta["samples_seen"] == 30 * 32
    assert (latest / "ema" / "diffusion_pytorch_model.safetensors").exists()
    # A half-written checkpoint (no COMPLETE marker) is never picked up.
    fake = run / "checkpoints" / "step_00000099"
    fake.mkdir()
    (run / "checkpoints" / "latest").write_text("step_00000099")
    assert latest_checkpoint(run).name == "step_00000030"
    # Starting over in a folder with checkpoints needs --resume.
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny(store, run))


def test_resume_in_process_reproduces_the_uninterrupted_curve(tmp_path, store):
    straight, split = tmp_path / "straight", tmp_path / "split"
    # sched_t0 fixed: by default the cosine cycle spans `steps`, which differs between the two halves
    train(tiny(store, straight, steps=40, objective="eclipse", sched_t0=40))
    train(tiny(store, split, steps=20, objective="eclipse", sched_t0=40))
    train(tiny(store, split, steps=40, objective="eclipse", sched_t0=40, resume=True))
    a, b = losses(straight), losses(split)
    assert sorted(b) == list(range(1, 41))
    assert [b[s] for s in range(1, 41)] == pytest.approx([a[s] for s in range(1, 41)], rel=1e-6, abs=1e-7)


def test_a_refused_resume_changes_nothing_in_the_run_folder(tmp_path, store):
    """Resuming an eclipse run as diffusion, or with the other L_proj reduction, is refused before the run's
    config is rewritten: the next bare --resume still continues the run as it was."""
    run = tmp_path / "run"
    train(tiny(store, run, steps=6, objective="eclipse", ckpt_every=3))
    saved = (run / "train_config.json").read_bytes()
    files = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file())
    for change, match in (({"objective": "diffusion"}, "objective='eclipse'.*objective='diffusion'"),
                          ({"proj_reduction": "sum"}, "proj_reduction='mean'.*proj_reduction='sum'")):
        asked = tiny(store, run, steps=9, objective="eclipse", ckpt_every=3, resume=True).to_dict() | change
        with pytest.raises(RuntimeError, match=match + ".*Nothing was changed"):
            train(TrainConfig(**asked))
        assert (run / "train_config.json").read_bytes() == saved
    assert sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()) == files
    train(tiny(store, run, steps=9, objective="eclipse", ckpt_every=3, resume=True))  # its own settings: continues
    assert max(losses(run)) == 9


def test_diffusion_baseline_trains_standardises_and_exports_a_stock_prior(tmp_path, store):
    from diffusers import PriorTransformer as Stock

    run = train(tiny(store, tmp_path / "run", objective="diffusion", steps=20, heldout_fraction=0.1,
                     eval_batches=1, eval_batch_size=8))
    model = load_prior(run)
    assert type(model) is Stock
    assert model.clip_std.min() > 0.1 and model.clip_mean.abs().max() > 0.01  # fitted from the data
    card = (run / "README.md").read_text()
    assert "diffusion baseline" in card and "eval/cos_to_image" in card


def test_no_heldout_shard_or_row_reaches_training_or_standardisation(tmp_path, store):
    """Keys trained on and the diffusion standardisation come from the run's shards less held-out rows only."""
    import numpy as np
    import pandas as pd

    chosen = ["shard-00000.parquet", "shard-00002.parquet"]
    run = train(tiny(store, tmp_path / "run", objective="diffusion", steps=12, heldout_fraction=0.25,
                     shards=chosen, record_keys=True, eval_batches=0))
    frames = {p.name: pd.read_parquet(p, columns=["key", "image_embed"]) for p in sorted(store.glob("shard-*.parquet"))}
    train_rows = pd.concat([frames[n] for n in chosen])
    train_rows = train_rows[~is_heldout(list(train_rows["key"]), 0.25, 0)]
    keys_file = tmp_path / "run" / "logs" / "keys-rank0.tsv"
    trained_on = {line.split("\t")[1] for line in keys_file.read_text().splitlines()}
    assert trained_on and trained_on <= set(train_rows["key"])
    image = np.stack(train_rows["image_embed"].to_numpy()).astype(np.float64)
    model = load_prior(run)
    np.testing.assert_allclose(model.clip_mean[0].detach().double().numpy(), image.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.clip_std[0].detach().double().numpy(), image.std(0), rtol=1e-4, atol=1e-6)
    everything = np.stack(pd.concat(frames.values())["image_embed"].to_numpy()).astype(np.float64)
    assert np.abs(everything.mean(0) - image.mean(0)).max() > 1e-3  # the check can tell the two apart


def test_projection_reduction_is_configurable_and_saved_runs_resume_with_their_own(tmp_path):
    assert TrainConfig().proj_reduction == "mean"
    with pytest.raises(ValueError, match="proj_reduction"):
        load_config(None, {"store": "/s", "out": "/o", "proj_reduction": "max"})
    run = tmp_path / "old"
    run.mkdir()
    saved = TrainConfig(store="/s", out=str(run)).to_dict()
    del saved["proj_reduction"]  # a run folder from before the key existed
    (run / "train_config.json").write_text(json.dumps(saved))
    assert cli_config(None, {"out": str(run)}, [], resume=True).proj_reduction == "mean"
    literal = tmp_path / "literal"  # a run saved with Eq. 3's sum resumes with the sum, whatever the default
    literal.mkdir()
    (literal / "train_config.json").write_text(json.dumps(TrainConfig(store="/s", out=str(literal),
                                                                      proj_reduction="sum").to_dict()))
    assert cli_config(None, {"out": str(literal)}, [], resume=True).proj_reduction == "sum"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", "train", *args]


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_uninterrupted_loss_curve(tmp_path, store):
    """A real subprocess is SIGKILLed mid-run, then `--resume` continues from the last complete
    checkpoint; its loss curve equals an uninterrupted run's, step for step (same seed, CPU)."""
    args = ["--store", str(store), "--objective", "eclipse", "--preset", "tiny", "--steps", "300",
            "--batch-size", "32", "--lr", "2e-3", "--log-every", "1", "--ckpt-every", "25",
            "--set", "heldout_fraction=0.1", "--set", "num_threads=1", "--set", "progress=false",
            "--set", "eval_every=0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_cli(*args, "--out", str(straight)), check=True, cwd=REPO, env=env, capture_output=True)

    proc = subprocess.Popen(_cli(*args, "--out", str(killed)), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "logs" / "train.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 115:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    last_ckpt = latest_checkpoint(killed)
    assert last_ckpt is not None and 100 <= int(last_ckpt.name.split("_")[1]) < 300
    assert len(losses(killed)) > int(last_ckpt.name.split("_")[1])  # it had logged past its checkpoint

    subprocess.run(_cli(*args, "--out", str(killed), "--resume"), check=True, cwd=REPO, env=env,
                   capture_output=True)
    a, b = losses(straight), losses(killed)
    assert sorted(b) == list(range(1, 301))  # records past the checkpoint were replaced, none doubled
    assert [b[s] for s in range(1, 301)] == pytest.approx([a[s] for s in range(1, 301)], rel=1e-6, abs=1e-7)
    assert (killed / "prior" / "diffusion_pytorch_model.safetensors").exists()


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path, store):
    """torchrun --nproc_per_node 2 (gloo): completes, ranks train on disjoint rows each epoch, checkpoint loads."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cli.main", "train", "--store", str(store), "--objective", "eclipse", "--preset", "tiny",
           "--steps", "12", "--batch-size", "16", "--out", str(run), "--ckpt-every", "6",
           "--set", "heldout_fraction=0.1", "--set", "record_keys=true", "--set", "num_threads=1",
           "--set", "progress=false"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen: list[dict[int, set[str]]] = []
    for rank in range(2):
        per_epoch: dict[int, set[str]] = {}
        for line in (run / "logs" / f"keys-rank{rank}.tsv").read_text().splitlines():
            epoch, key = line.split("\t")
            per_epoch.setdefault(int(epoch), set()).add(key)
        seen.append(per_epoch)
    assert sum(len(v) for v in seen[0].values()) >= 12 * 16 // 2
    for epoch in set(seen[0]) & set(seen[1]):
        assert seen[0][epoch].isdisjoint(seen[1][epoch])
    everything = set().union(*seen[0].values(), *seen[1].values())
    assert not is_heldout(sorted(everything), 0.1, 0).any()
    state = json.loads((latest_checkpoint(run) / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["positions"]) == 2 and state["samples_seen"] == 12 * 16 * 2
    assert isinstance(load_prior(latest_checkpoint(run) / "prior"), PriorTransformer)
    assert isinstance(load_prior(run / "prior"), PriorTransformer)


def test_continue_from_an_exported_prior_on_chosen_shards(tmp_path, store):
    first = train(tiny(store, tmp_path / "a", steps=20))
    keys_by_shard = dict(__import__("storage_schema").EmbeddingStore(store).keys())
    chosen = ["shard-00002.parquet", "shard-00003.parquet"]
    cfg = tiny(store, tmp_path / "b", steps=1, lr=0.0, init_from=str(first), shards=chosen, record_keys=True)
    second = train(cfg)
    # lr 0: the continued prior is the one it started from, so it really was loaded
    a, b = load_prior(first).state_dict(), load_prior(second).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    trained_on = {line.split("\t")[1] for line in (tmp_path / "b" / "logs" / "keys-rank0.tsv").read_text().splitlines()}
    allowed = set(keys_by_shard[chosen[0]]) | set(keys_by_shard[chosen[1]])
    assert trained_on and trained_on <= allowed
    with pytest.raises(StoreError, match="does not have"):
        train(tiny(store, tmp_path / "c", shards=["shard-00009.parquet"]))


def test_text_length_below_the_store_context_is_refused_and_recorded_in_the_export(tmp_path):
    from storefixtures import write_synthetic_store as wss

    wss(tmp_path / "short", rows=64, dim=32, shards=2, tokens=(3, 8))
    # synthetic stores declare context 77, so a 20-position prior cannot take them ...
    with pytest.raises(ValueError, match="takes 20 text positions but the store's encoder has context length 77"):
        train(tiny(tmp_path / "short", tmp_path / "r0", text_length=20))
    # ... while the full 77 works and the exported prior keeps its text length
    prior = train(tiny(tmp_path / "short", tmp_path / "r1", steps=3, text_length=77, ckpt_every=3))
    assert load_prior(prior).config.num_embeddings == 77


def test_architecture_knobs_reach_the_trained_and_exported_prior(tmp_path, store):
    """dropout, num_layers and text_hidden=False are built into the model, trained, and saved in its config."""
    run = train(tiny(store, tmp_path / "run", steps=10, dropout=0.1, num_layers=3, text_hidden=False))
    prior = load_prior(run)
    assert (prior.config.dropout, prior.config.num_layers, prior.config.encoder_hid_proj_type) == (0.1, 3, None)
    assert prior.encoder_hidden_states_proj is None and len(prior.transformer_blocks) == 3
    default = load_prior(train(tiny(store, tmp_path / "default", steps=2)))
    assert (default.config.dropout, default.config.num_layers, default.config.encoder_hid_proj_type) == (
        0.0, 2, "linear")
