"""`finetune run` under torchrun: 2 CPU processes on gloo, as a cluster runs them.

- The packaged recipes (LP-FT head included) from an empty cache, a warm one, and node-local
  caches that disagree, each writing exactly one run folder.
- A run preempted by SIGTERM mid-epoch and resumed ends with the weights of one never stopped.
- A decision one rank would take alone (out of memory, a batch it cannot decode) is taken by all.
- A rank that fails or hangs stops every rank within the process group's timeout, with one line.
- 2 processes train the weights 1 process trains with the global batch (no BatchNorm: exact), also
  when each step accumulates 3 batches per process and keeps a weight average.

Most commands run in one torchrun launch (`tests/ddp_driver.py`, a module fixture): a launch
costs ~10 s of interpreter and torch start-up on a loaded 2-core machine.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.app.pipeline import run
from finetune.errors import TrainingError
from finetune.method import RunOptions
from finetune.train.checkpoint import load_checkpoint
from tests.conftest import (
    finish,
    invoke,
    launch,
    one_line_error,
    torchrun,
    torchrun_cmd,
    torchrun_env,
    write_images,
)

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "ddp_driver.py"
COMMON = ("image_size=32", "epochs=2", "augment=false", 'init_head="random"', "label_smoothing=0.0")
STRATEGIES = ("linear-probe", "stage-probe", "partial-finetune", "full-finetune", "auto")
FINETUNES = ("partial-finetune", "full-finetune")
ACCUM = ("accum_steps=3", "ema=0.5")


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def _one_run(out: Path) -> Path:
    runs = [p for p in out.iterdir()] if out.is_dir() else []
    assert len(runs) == 1, runs  # written once, by rank 0
    return runs[0]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One torchrun launch of 2 gloo processes running every command below; (exit codes, paths)."""
    tmp = tmp_path_factory.mktemp("cluster")
    data = tmp / "data"
    for k, name in enumerate(("a", "b", "c")):
        write_images(data / name, k, 8, 32)  # 24 images: 18 train, 9 per rank
    torch.manual_seed(0)
    import timm
    from safetensors.torch import save_file

    weights = tmp / "w.safetensors"
    model = timm.create_model("test_efficientnet", pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    base = ["--backbone", "test_efficientnet", "--weights", weights, "--workers", "0", "--device", "cpu"]

    def cmd(strategy: str, out: str, *extra) -> list:
        sets = ["--set", "epochs=2"] if strategy in FINETUNES else []
        return ["run", data, "--strategy", strategy, *base, *sets, "--out", tmp / out, *extra]

    specs, names = [], []

    def add(name: str, args: list, caches: tuple[str, str], faults: dict | None = None) -> None:
        names.append(name)
        caches = [str(tmp / c) for c in caches]
        specs.append({"args": [str(a) for a in args], "cache": caches, "faults": faults or {}, "go_on": True})

    for s in STRATEGIES:  # each strategy from an empty cache of its own, then from the same cache, warm
        add(f"{s}/cold", cmd(s, f"{s}-cold"), (f"cache-{s}", f"cache-{s}"))
        add(f"{s}/warm", cmd(s, f"{s}-warm"), (f"cache-{s}", f"cache-{s}"))
    for s in ("linear-probe", "partial-finetune"):  # node-local caches: one node warm, the other empty
        add(f"{s}/r0warm", cmd(s, f"{s}-r0warm"), (f"cache-{s}", f"empty-{s}-1"))
        add(f"{s}/r1warm", cmd(s, f"{s}-r1warm"), (f"empty-{s}-0", f"cache-{s}"))
    resume = ["--set", "batch_size=3", "--set", "epochs=2"]  # 3 batches per rank and epoch
    add("whole", cmd("partial-finetune", "whole", *resume), ("c0", "c1"))
    add("preempted", cmd("partial-finetune", "preempted", *resume), ("c0", "c1"), {"sigterm_at": 4})
    faults = {"oom_rank": 1, "empty_rank": 1}
    add("faults", cmd("partial-finetune", "faults", *resume, "--keep-checkpoints"), ("c0", "c1"), faults)
    convnext = ["--strategy", "full-finetune", "--backbone", "test_convnext", "--no-pretrained"]
    sets = [a for kv in (*COMMON, "batch_size=3", "lr=0.01") for a in ("--set", kv)]
    add(
        "convnext",
        ["run", data, *convnext, "--workers", "0", "--device", "cpu", "--out", tmp / "two", *sets],
        ("c0", "c1"),
    )
    sets = [a for kv in (*COMMON, *ACCUM, "batch_size=3", "lr=0.01") for a in ("--set", kv)]
    add(
        "accum",
        ["run", data, *convnext, "--workers", "0", "--device", "cpu", "--out", tmp / "accum", *sets],
        ("c0", "c1"),
    )

    (tmp / "spec.json").write_text(json.dumps(specs))
    args = [tmp / "spec.json", tmp / "result.json"]
    proc = finish(launch(torchrun_cmd(*args, script=DRIVER), torchrun_env()), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    codes = dict(zip(names, json.loads((tmp / "result.json").read_text()), strict=True))
    return {"codes": codes, "tmp": tmp, "data": data, "stderr": proc.stderr, "base": base}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_packaged_recipes_run_under_torchrun_from_an_empty_and_a_warm_cache(cluster, strategy):
    tmp = cluster["tmp"]
    assert cluster["codes"][f"{strategy}/cold"] == 0 and cluster["codes"][f"{strategy}/warm"] == 0
    cold, warm = _one_run(tmp / f"{strategy}-cold"), _one_run(tmp / f"{strategy}-warm")
    m_cold, m_warm = (json.loads((d / "metrics.json").read_text()) for d in (cold, warm))
    assert m_warm["val"]["accuracy"] == m_cold["val"]["accuracy"]
    config = json.loads((cold / "config.json").read_text())
    if config["strategy"] in FINETUNES:
        assert config["recipe"]["init_head"] == "probe" and "probe_head" in config["extra"]  # LP-FT ran
        assert m_cold["train"]["world_size"] == 2
        a, b = _weights(cold), _weights(warm)  # features from the cache are the features extracted
        assert all(torch.equal(a[k], b[k]) for k in a)
    if strategy == "linear-probe":
        assert m_warm["timing"]["cache_hits"] == 24  # every feature from the cache the first run wrote


@pytest.mark.parametrize("strategy", ["linear-probe", "partial-finetune"])
def test_node_local_caches_that_disagree_neither_hang_nor_change_the_result(cluster, strategy):
    """Rank 0 decides what to extract; rows a rank's own cache lacks come from rank 0."""
    tmp = cluster["tmp"]
    cold = _one_run(tmp / f"{strategy}-cold")
    for case in ("r0warm", "r1warm"):
        assert cluster["codes"][f"{strategy}/{case}"] == 0
        got = _one_run(tmp / f"{strategy}-{case}")
        a, b = _weights(cold), _weights(got)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), case


def test_a_preempted_torchrun_run_resumes_to_the_weights_of_one_never_stopped(cluster):
    """SIGTERM on rank 0 mid-epoch 2: both ranks stop after the same batch, rank 0 saves (epoch,
    batch, world size); a new 2-process launch rebuilds each rank's shard and finishes the run."""
    tmp, codes = cluster["tmp"], cluster["codes"]
    assert codes["whole"] == 0 and codes["preempted"] == 143
    assert "SIGTERM: stopping after this batch" in cluster["stderr"]
    run_dir = _one_run(tmp / "preempted")
    meta, _, _ = load_checkpoint(run_dir / "checkpoint")
    assert (meta["epoch"], meta["batch"], meta["world"]) == (1, 1, 2)  # batch 4 of 6 = epoch 2, batch 1

    refused = invoke("run", cluster["data"], "--resume", run_dir)  # 1 process: another sample order
    one_line_error(refused, "trained by 2 processes", "torchrun --nproc-per-node 2")

    proc = torchrun("run", cluster["data"], "--resume", run_dir, FINETUNE_CACHE=str(tmp / "c0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _weights(_one_run(tmp / "whole")), _weights(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_out_of_memory_or_an_undecodable_batch_on_one_rank_is_decided_by_all(cluster):
    """Rank 1 alone decodes nothing of its first batch, and runs out of memory on full batches:
    every rank skips that step and halves its micro-batches, so all take the same steps."""
    assert cluster["codes"]["faults"] == 0
    run_dir = _one_run(cluster["tmp"] / "faults")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["micro_batches"] == 2  # rank 0 never ran out of memory itself
    meta, _, _ = load_checkpoint(run_dir / "checkpoint")
    assert meta["batches_seen"] == 6 and meta["step"] == 5  # one batch skipped, by both ranks
    assert "out of GPU memory: retrying with batches of 2 images" in cluster["stderr"]
    # the images rank 1 alone could not decode are in the folder rank 0 wrote
    skipped = json.loads((run_dir / "problems.json").read_text())["skipped"]
    assert [r["reason"] for r in skipped] == ["injected decode failure"] * 3, skipped


def _failing_launch(tmp: Path, data: Path, base: list, faults: dict, **env) -> tuple:
    args = ["run", data, "--strategy", "partial-finetune", *base, "--set", "batch_size=3", "--out", tmp / "o"]
    spec = [{"args": [str(a) for a in args], "cache": [str(tmp / "c")] * 2, "faults": faults}]
    (tmp / "spec.json").write_text(json.dumps(spec))
    start = time.monotonic()
    cmd = torchrun_cmd(tmp / "spec.json", tmp / "r.json", script=DRIVER)
    proc = finish(launch(cmd, torchrun_env(**env)), 300)
    return proc, time.monotonic() - start


def _errors(stderr: str) -> list[str]:
    """The `error:` lines of our processes; and no traceback goes through the package's code
    (torchrun's own report of a failed launch is a traceback of torch's launcher, not ours)."""
    ours = [ln for ln in stderr.splitlines() if ln.strip().startswith("File") and "/finetune/" in ln]
    assert not ours, stderr[-3000:]
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def test_a_rank_that_raises_stops_every_rank_with_one_line(cluster, tmp_path):
    proc, _ = _failing_launch(tmp_path, cluster["data"], cluster["base"], {"raise_at": [1, 1]})
    assert proc.returncode != 0
    lines = _errors(proc.stderr)
    assert "error: injected failure on rank 1 — none: a test" in lines, proc.stderr[-3000:]
    others = [ln for ln in lines if "injected" not in ln]  # rank 0: one line, unless torchrun ended it first
    assert len(others) <= 1 and all(ln.startswith("error: process 0 of 2 lost the others") for ln in others)


def test_a_rank_that_hangs_stops_every_rank_at_the_process_group_timeout(cluster, tmp_path):
    proc, seconds = _failing_launch(
        tmp_path, cluster["data"], cluster["base"], {"hang_at": [1, 1]}, FINETUNE_DIST_TIMEOUT="10"
    )
    assert proc.returncode != 0
    lines = _errors(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: process 0 of 2 lost the others"), proc.stderr
    assert seconds < 240  # bounded by the 10 s timeout (+ torchrun's 30 s grace), not the hang's hour


def test_two_gloo_processes_train_the_single_process_weights(cluster, tmp_path):
    """The reference is one process walking the same global sample order (`DistributedSampler` with
    num_replicas=1 and the same seed) with the global batch (2 x 3) and the scaled LR (2 x 0.01):
    with a BatchNorm-free model (timm test_convnext: LayerNorm), no augmentation and 18 training
    images (divisible by 2 x 3), the averaged gradients are the single-process ones."""
    single = run(
        RunOptions(
            data=cluster["data"],
            strategy="full-finetune",
            backbone="test_convnext",
            pretrained=False,
            workers=0,
            device="cpu",
            overrides=(*COMMON, "batch_size=6", "lr=0.02"),
            out=tmp_path / "one",
        ),
    )
    assert cluster["codes"]["convnext"] == 0 and "lr 0.01 x 2 = 0.02" in cluster["stderr"]
    a, b = _weights(single.run_dir), _weights(_one_run(cluster["tmp"] / "two"))
    assert a.keys() == b.keys() and b["head.weight"].abs().sum() > 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)


def test_accumulated_steps_on_two_processes_train_the_one_large_batch_weights(cluster, tmp_path):
    """Each rank's 9 images as 3 batches of 3 accumulated into one step, on 2 processes, is one step
    on all 18 images: the weights (and their average, which both validate alike) of one process
    with a batch of 18 at the LR scaled by 2 processes x 3 batches."""
    single = run(
        RunOptions(
            data=cluster["data"],
            strategy="full-finetune",
            backbone="test_convnext",
            pretrained=False,
            workers=0,
            device="cpu",
            overrides=(*COMMON, "ema=0.5", "batch_size=18", "lr=0.06"),
            out=tmp_path / "one",
        ),
    )
    assert cluster["codes"]["accum"] == 0
    assert "2 processes, 3 batches per step: effective batch 18, lr 0.01 x 6 = 0.06" in cluster["stderr"]
    two = _one_run(cluster["tmp"] / "accum")
    metrics = json.loads((two / "metrics.json").read_text())
    assert (
        metrics["train"]["effective_batch"] == 18
        and metrics["train"]["weights"] == single.metrics["train"]["weights"]
    )
    a, b = _weights(single.run_dir), _weights(two)
    assert a.keys() == b.keys() and b["head.weight"].abs().sum() > 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_with_their_own_caches_write_one_run_folder(cluster, tmp_path):
    """The README's two-machine command on one machine: two launchers, --nnodes 2, a c10d rendezvous
    on 127.0.0.1, a feature cache per "node" (FINETUNE_CACHE). Only node 0's rank 0 writes."""
    out = tmp_path / "runs"
    args = ["run", cluster["data"], "--strategy", "partial-finetune", *cluster["base"], "--set", "epochs=1"]
    for _attempt in range(3):  # the rendezvous port is chosen here, then bound by node 0: retry a clash
        port = _free_port()
        endpoint = ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"test-{port}"]
        rdzv = ["--nnodes", "2", "--rdzv-backend", "c10d", *endpoint]
        nodes = [
            launch(
                torchrun_cmd(*args, "--out", out, nproc=1, rdzv=rdzv),
                torchrun_env(FINETUNE_CACHE=str(tmp_path / f"cache-node{n}")),
            )
            for n in (0, 1)
        ]
        procs = [finish(p, 300) for p in nodes]
        if all(p.returncode == 0 for p in procs) or "Address already in use" not in procs[0].stderr:
            break
    assert [p.returncode for p in procs] == [0, 0], procs[0].stderr[-2000:] + procs[1].stderr[-2000:]
    run_dir = _one_run(out)
    assert json.loads((run_dir / "metrics.json").read_text())["train"]["world_size"] == 2
    assert sum(p.stdout.count("run folder:") for p in procs) == 1
    assert (tmp_path / "cache-node0" / "features").is_dir()  # node 0 wrote its cache; node 1 needed none


def test_a_class_balanced_sampler_is_refused_under_torchrun(make_folder, tmp_path):
    from finetune.runtime import Dist
    from tests.test_train import make_trainer

    data = make_folder({"red": 6, "blue": 6})
    two = Dist(world=2, rank=0, local_rank=0)  # as torchrun would set it
    with pytest.raises(TrainingError, match="balance=weights"):
        make_trainer(data, tmp_path, "partial-finetune", 'balance="sampler"', dist=two)
