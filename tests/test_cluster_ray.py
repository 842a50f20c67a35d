"""A real two-node Ray cluster on loopback (scripts/ray_local_cluster.sh: a head with 1 CPU and
a worker node with 2, each its own raylet): `scripts/submit_ray_job.sh` submits a real dsae-run
with `ray job submit`, and a run whose worker node is SIGKILLed mid-harvest and mid-training
(then replaced, as a preempted node is) finishes with a clean run's store and weights, and a
harvest whose worker node is lost for good finishes on the head.

In the `cluster` group (pytest -m cluster): its nodes are Ray processes of their own, so it runs
apart from the tests that start local Ray instances or kill `ray::` processes by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from distributed_sae.store import ActivationStore
from conftest import HANG_S

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "ray_local_cluster.sh"
PORT = 6390
MEMBER = "topk_w64_k4_s0"


def cluster_env() -> dict:
    # The nodes run this interpreter's Ray, and the job's `dsae-run` comes from its bin folder.
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    return dict(os.environ, PATH=path, DSAE_RAY_PORT=str(PORT), RAY_AUTH_MODE="disabled")


def script(*args: str, timeout: float = 300) -> str:
    proc = subprocess.run(["bash", str(SCRIPT), *args], env=cluster_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def ray_cluster():
    pytest.importorskip("ray.dashboard.modules.job.sdk")
    script("stop")
    script("start")
    yield {"address": script("address"), "dashboard": script("dashboard")}
    script("stop")


def node_cpus(address: str) -> dict:
    """{label: CPUs} of the live nodes, asked of the cluster by a separate driver."""
    code = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); "
            "print('NODES', json.dumps({('head' if 'dsae_head' in n['Resources'] else 'worker'): "
            "n['Resources'].get('CPU', 0) for n in ray.nodes() if n['Alive']}))" % address)
    out = subprocess.run([sys.executable, "-c", code], env=cluster_env(), capture_output=True,
                         text=True, timeout=HANG_S)
    # Ray may print more after it (a lost raylet's notice, on stdout): find the line.
    line = [x for x in out.stdout.splitlines() if x.startswith("NODES ")][-1]
    return json.loads(line[len("NODES "):])


def run_args(model_dir: str, out: Path, n_units: int) -> list[str]:
    # 4 contexts x 32 tokens per unit; 2 harvest actors and 2 Ray Train workers, 1 CPU each,
    # spread over the head's CPU and the worker node's two.
    return [f"model.name={model_dir}", f"out_dir={out}", "data.context_size=32",
            f"data.n_tokens={128 * n_units}", "data.seed=1",
            "harvest.hooks=[blocks.1.hook_resid_post]", "harvest.contexts_per_unit=4",
            "harvest.batch_size=2", "harvest.num_actors=2", "store.chunk_tokens=64",
            "sae.widths=[64]", "sae.k=4", "train.batch_size=128", "train.tokens=20480",
            "train.log_every=5", "eval.spliced_tokens=256"]


def test_a_submitted_ray_job_runs_on_the_cluster_and_its_results_land(ray_cluster,
                                                                      tiny_llama_dir, tmp_path):
    # Both nodes registered (each a raylet of its own, with its own CPUs).
    wait_for("both nodes", lambda: node_cpus(ray_cluster["address"]) == {"head": 1.0,
                                                                          "worker": 2.0}, 300)
    out = tmp_path / "job"
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "submit_ray_job.sh"), "--address",
         ray_cluster["dashboard"], "--", *run_args(tiny_llama_dir, out, 60)],
        env=cluster_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "succeeded" in proc.stdout + proc.stderr
    assert json.loads((out / "train" / "bank.json").read_text())["members"] == [MEMBER]
    assert (out / "eval" / "summary.md").is_file()
    assert (out / "export" / MEMBER).is_dir()
    assert ActivationStore.open(out / "store").is_complete


def wait_for(what, check, timeout: float = 900.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not happen in {timeout} s")


def loaded(log_path: Path) -> int:
    """Harvest workers that have loaded their model (a kill before that is another path: the
    actor dies while loading, or Ray re-places it, and no unit is lost)."""
    return log_path.read_text(errors="replace").count("loaded its model")


def commits(out: Path) -> int:
    return len(list((out / "store" / "_commits").glob("u*.json")))


def test_losing_the_worker_node_mid_harvest_and_mid_training_changes_nothing(
        ray_cluster, tiny_llama_dir, tmp_path):
    """The run joins the cluster (cluster.address). Its worker node (2 of the 3 CPUs: one
    harvest actor and one Ray Train worker) is SIGKILLed after 20 commits, and again while rank
    0 holds at step 60 (DSAE_FAULT_SIGNAL=HOLD), after the checkpoint of step 40; a new worker
    node joins each time. The store holds a clean run's tokens, and the weights are those of
    the same job run without a loss."""
    n_units = 400
    env = cluster_env()
    runner = [sys.executable, "-c", "from distributed_sae.cli import run_main; run_main()"]

    def args(out: Path) -> list[str]:
        return [*run_args(tiny_llama_dir, out, n_units), "eval.spliced=false",
                f"cluster.address={ray_cluster['address']}", "train.workers=2",
                "train.placement=cost", "train.cpus=1", "train.checkpoint_every=40"]

    clean = tmp_path / "clean"  # the same job on the same cluster, nothing lost
    ref = subprocess.run([*runner, *args(clean)], env=env, capture_output=True, text=True,
                         timeout=1200)
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = tmp_path / "lossy"
    fault = dict(env, DSAE_FAULT_AT_STEP="60", DSAE_FAULT_RANK="0", DSAE_FAULT_SIGNAL="HOLD")
    log_path = tmp_path / "lossy.log"  # a file, not a pipe nobody reads until the end
    with open(log_path, "w") as sink:
        job = subprocess.Popen([*runner, *args(out)], env=fault, stdout=sink,
                               stderr=subprocess.STDOUT)
    try:
        wait_for("both harvest workers loaded", lambda: loaded(log_path) >= 2)
        wait_for("20 commits", lambda: commits(out) >= 20)
        assert commits(out) < n_units, "the harvest finished before the node could be lost"
        script("kill-worker")
        script("start-worker")
        wait_for("rank 0 at step 60", (out / "train" / ".fault_injected").is_file)
        script("kill-worker")
        script("start-worker")
        job.wait(timeout=1800)
    finally:
        job.kill()
    log = log_path.read_text()
    assert job.returncode == 0, log[-4000:]
    assert "died" in log and "re-queueing" in log  # the harvest lost actors and redid units
    a, b = ActivationStore.open(clean / "store"), ActivationStore.open(out / "store")
    assert a.is_complete and b.is_complete
    assert np.array_equal(a.tokens(0, a.n_tokens), b.tokens(0, b.n_tokens))
    wa = load_file(str(clean / "train" / MEMBER / "sae_weights.safetensors"))
    wb = load_file(str(out / "train" / MEMBER / "sae_weights.safetensors"))
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def test_a_worker_node_lost_for_good_leaves_the_harvest_to_the_head(
        ray_cluster, tiny_llama_dir, tmp_path, smollm2_tokenizer):
    """The worker node is SIGKILLed mid-harvest and no node replaces it: the actor lost with it
    gets a replacement that no live node has room for (the head's one CPU runs the other
    actor), so it waits unplaced while the head's actor harvests every unit left; the store
    holds each token once, in order. (Last in this file: it restarts the worker node after.)"""
    from distributed_sae.config import DataConfig
    from distributed_sae.data import load_contexts

    n_units = 400
    wait_for("both nodes", lambda: node_cpus(ray_cluster["address"]) == {"head": 1.0,
                                                                          "worker": 2.0}, 300)
    out = tmp_path / "lost"
    cmd = [sys.executable, "-c", "from distributed_sae.cli import harvest_main; harvest_main()",
           *run_args(tiny_llama_dir, out, n_units), f"cluster.address={ray_cluster['address']}"]
    log_path = tmp_path / "lost.log"
    try:
        with open(log_path, "w") as sink:
            job = subprocess.Popen(cmd, env=cluster_env(), stdout=sink, stderr=subprocess.STDOUT)
        try:
            wait_for("both harvest workers loaded", lambda: loaded(log_path) >= 2)
            wait_for("20 commits", lambda: commits(out) >= 20)
            assert commits(out) < n_units, "the harvest finished before the node could be lost"
            script("kill-worker")
            wait_for("the worker node declared dead",  # and not replaced
                     lambda: node_cpus(ray_cluster["address"]) == {"head": 1.0}, 300)
            job.wait(timeout=1200)
        finally:
            job.kill()
    finally:
        script("start-worker")
    log = log_path.read_text()
    assert job.returncode == 0, log[-4000:]
    assert "re-queueing" in log
    store = ActivationStore.open(out / "store")
    assert store.is_complete and store.verify() == []
    data = DataConfig(context_size=32, n_tokens=128 * n_units, seed=1)
    want = load_contexts(data, smollm2_tokenizer, n_units * 4).reshape(-1)
    assert np.array_equal(store.tokens(0, store.n_tokens), want)
