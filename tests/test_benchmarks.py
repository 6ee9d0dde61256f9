"""Every benchmark runs at a tiny size, so none can rot unnoticed: each script as a subprocess with the smallest
arguments that still take its whole path, its promised `name=<x>` last lines parsed (no timing asserted)."""

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Smoke tests of benchmarks that live in another test file: script -> that test.
ELSEWHERE = {
    "benchmarks/loss_balance.py": ("tests/test_loss_balance.py", "test_both_parts_run_and_print_their_figures"),
}


def run_script(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`script` (a path from the repo root) run as the benchmarks are run, one OpenMP thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def promised(script: str, names: list[str]) -> list[str]:
    """`names`, each checked to be one the script's docstring promises (so the test follows the docstring)."""
    doc = ast.get_docstring(ast.parse((ROOT / script).read_text())) or ""
    missing = [n for n in names if f"{n}=" not in doc]
    assert not missing, f"{script}'s docstring does not name {missing}"
    return names


def last_figures(out: subprocess.CompletedProcess, script: str, names: list[str]) -> dict[str, float]:
    """The last len(names) lines of stdout as name=<float>: exactly `names`, every value finite."""
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()[-len(names):]
    figures = dict(line.split("=", 1) for line in lines)
    assert list(figures) == promised(script, names), lines
    values = {k: float(v) for k, v in figures.items()}
    assert all(math.isfinite(v) for v in values.values()), values
    return values


def test_encode_runs_the_shard_to_store_path_and_the_bare_model():
    script = "benchmarks/encode.py"
    out = run_script(script, "--small", "--shards", "1", "--per-shard", "2", "--batch-size", "2", "--rounds", "1",
                     "--captions-per-image", "2")
    values = last_figures(out, script, ["encode_ms_per_row", "encode_pipeline_efficiency"])
    assert values["encode_ms_per_row"] > 0 and values["encode_pipeline_efficiency"] > 0
    assert "rows=4 images=2" in out.stdout  # two captions per image: each image gives two store rows


def test_store_io_reads_every_layout_and_the_batch_path():
    script = "benchmarks/store_io.py"
    out = run_script(script, "--shards", "2", "--rows", "20", "--dim", "16", "--rounds", "1")
    values = last_figures(out, script, ["batch_path_vs_raw_read", "store_read_gbps_per_core", "store_bytes_ratio"])
    assert values["store_bytes_ratio"] > 1  # keys, captions, urls and Parquet's framing on top of the payload


def test_train_times_the_memory_store_and_clip_modes():
    script = "benchmarks/train.py"
    # widths x 1/26 keep the image tower's width (64) a multiple of its 16 heads
    out = run_script(script, "--rounds", "1", "--steps", "1", "--batch-size", "2", "--width-scale", str(1 / 26),
                     "--depth-scale", "0.02")
    values = last_figures(out, script, ["train_input_efficiency", "cache_speedup",
                                        "cache_speedup_flop_model_real_pair"])
    assert values["cache_speedup_flop_model_real_pair"] > 1  # the image tower's FLOPs come on top of the prior's


def test_train_refuses_a_width_scale_that_splits_the_heads_unevenly():
    out = run_script("benchmarks/train.py", "--width-scale", "0.05")
    assert out.returncode != 0 and "not a multiple of its 16 heads" in out.stderr
    assert "Traceback" not in out.stderr


def write_world(folder: Path, shard: int, heldin_shards: int, heldout_shards: int) -> None:
    """A reproduce world folder as `benchmarks/memorisation.py` reads it (demo_state.json and data/store): the
    demo world's captions, held-in shards from the kept compositions, then the held-out compositions' shards;
    random embeddings (the study's path, not its findings, is under test)."""
    from storefixtures import tiny_info

    from demo.world import demo_world, split_by_pairs
    from storage_schema import StoreWriter, build_table

    world = demo_world(seed=0)
    held_pairs = world.holdout_pairs(0.75, seed=0)  # reproduce's default fraction
    kept, held, n = [], [], shard
    while len(kept) < shard * heldin_shards or len(held) < shard * heldout_shards:  # ~1:3 kept:held
        n *= 2
        kept, held = split_by_pairs(world.sample_specs(n, seed=0), held_pairs)
    parts = ([kept[i * shard:(i + 1) * shard] for i in range(heldin_shards)]
             + [held[i * shard:(i + 1) * shard] for i in range(heldout_shards)])
    assert all(len(p) == shard for p in parts)
    info = tiny_info()
    writer = StoreWriter(folder / "data" / "store", info)
    rng = np.random.default_rng(0)
    for s, specs in enumerate(parts):
        lens = rng.integers(2, 12, size=shard)
        writer.write_shard(f"{s:05d}", build_table(
            info, keys=[f"{s}-{i}" for i in range(shard)], captions=[spec.caption for spec in specs],
            image_embeds=rng.standard_normal((shard, info.image_dim)).astype(np.float16),
            text_embeds=rng.standard_normal((shard, info.text_dim)).astype(np.float16),
            text_hidden=[rng.standard_normal((int(k), info.hidden_dim)).astype(np.float16) for k in lens],
            truncated=[False] * shard, urls=[None] * shard))
    state = {"params": {"shard_size": shard, "sizes_max": shard * heldin_shards}}
    (folder / "demo_state.json").write_text(json.dumps(state))


@pytest.mark.slow
def test_memorisation_trains_scores_and_compares_the_cells(tmp_path):
    script = "benchmarks/memorisation.py"
    write_world(tmp_path / "world", shard=40, heldin_shards=4, heldout_shards=1)
    # x 0.03: the baseline trains on 45 rows (one shard of 40) for 15 steps, the data cells on 2 and 4 shards
    out = run_script(script, "--world", str(tmp_path / "world"), "--out", str(tmp_path / "study"), "--scale", "0.03",
                     "--factors", "inputs", "data", "--eclipse-lambda", "0.2", "--seeds", "2", "--eval-seeds", "1",
                     "--batch-size", "8", "--threads", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "check: held-out R@1" in out.stderr  # agrees with demo.experiment.caption_retrieval
    report = json.loads((tmp_path / "study" / "memorisation.json").read_text())
    cells = report["cells"]
    assert [c["factor"] for c in cells] == ["baseline", "inputs", "data", "data", "objective"]
    assert [c["settings"]["rows"] for c in cells] == [45, 45, 90, 180, 45]
    for c in cells:
        assert len(c["runs"]) == 2 and all((Path(r) / "prior" / "config.json").exists() for r in c["runs"])
        assert all(math.isfinite(m["mean"]) for m in c["metrics"].values()), c["metrics"]
        assert all("verdict" in m for m in c["metrics"].values()) == (c["factor"] != "baseline")
    assert set(report["baselines"]) == {"45", "90", "180"}
    assert "paired differences from the baseline cell" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU smoke run below covers a machine with CUDA")
def test_bench_gpu_without_cuda_says_it_needs_a_gpu_in_one_line():
    out = run_script("benchmarks/gpu/bench_gpu.py")
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert "needs a CUDA GPU" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bench_gpu.py needs CUDA")
def test_bench_gpu_on_a_gpu_runs_the_prior_and_both_towers():
    script = "benchmarks/gpu/bench_gpu.py"
    out = run_script(script, "--batch", "8", "--prior-steps", "2", "--no-compile", "--vision-batch", "2", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line and " " not in line)
    names = promised(script, ["prior_steps_per_s", "prior_60k_steps_hours", "ViT_L_14_images_per_s"])
    assert set(names) | {"ViT_bigG_14_images_per_s"} <= set(figures), out.stdout
    assert all(math.isfinite(float(v)) for v in figures.values()), figures


def smoked_here() -> set[str]:
    """The scripts this file's tests run: the first argument of each run_script call inside a test, as written,
    or through a `script = "..."` assignment in that test."""
    tree = ast.parse(Path(__file__).read_text())
    found = set()
    for fn in tree.body:
        if not (isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_")):
            continue
        names = {t.id: node.value.value for node in ast.walk(fn) if isinstance(node, ast.Assign)
                 for t in node.targets if isinstance(t, ast.Name) and isinstance(node.value, ast.Constant)}
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run_script" and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant):
                    found.add(arg.value)
                elif isinstance(arg, ast.Name) and arg.id in names:
                    found.add(names[arg.id])
    return found


def test_every_benchmark_has_a_smoke_test():
    scripts = {p.relative_to(ROOT).as_posix() for pattern in ("benchmarks/*.py", "benchmarks/gpu/*.py")
               for p in ROOT.glob(pattern)}
    for script, (test_file, test_name) in ELSEWHERE.items():
        tree = ast.parse((ROOT / test_file).read_text())
        assert any(isinstance(f, ast.FunctionDef) and f.name == test_name for f in tree.body), (test_file, test_name)
        assert Path(script).name in (ROOT / test_file).read_text()
    missing = scripts - smoked_here() - set(ELSEWHERE)
    assert not missing, f"benchmarks without a smoke test in tests/test_benchmarks.py: {sorted(missing)}"
