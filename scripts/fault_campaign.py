"""Fault campaign: SIGKILL harvests and trainings at random moments, restart each to the end, and
compare it with a clean run. Anyone can run it (a tiny random Llama with SmolLM2's tokenizer, so
a fault costs seconds, not minutes):

    python scripts/fault_campaign.py --seed 0 --count 20 [--out /tmp/dsae_campaign] [--json F]

Faults, taken in turn, each at a moment drawn from the seed:
  actor-load    a harvest actor killed while it loads the model      (fault point harvest_load)
  actor-unit    a harvest actor killed once c units are committed    (SIGKILL from outside)
  actor-write   a harvest actor killed inside its n-th unit write    (fault point store_write)
  driver        the harvest driver killed once c units are committed, then started again
  train-worker  one of two Ray Train workers killed after c checkpoints (the job recovers alone)
  train-group   the whole dsae-train process group killed after c checkpoints, then restarted
  ckpt-write    dsae-train killed inside its n-th checkpoint write, then restarted
  member-write  dsae-train killed between a member's weights and its cfg.json, then restarted

A fault point (distributed_sae/faults.py) is a real SIGKILL the process sends itself at a moment
too short to hit from outside. Each run is compared with the clean run of the same layout: the
store's units (lost: a clean unit missing or different; duplicated: the token multiset's excess)
and its activations; the members' weights, bit for bit. Prints the table; exit 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

UNITS = 160  # 4 contexts of 32 tokens each: 20480 rows, ~10 s of tiny-model harvest on 2 actors
HOOK = "blocks.1.hook_resid_post"
HARVEST = ["data.context_size=32", f"data.n_tokens={32 * 4 * UNITS}", "data.seed=1",
           f"harvest.hooks=[{HOOK}]", "harvest.contexts_per_unit=4", "harvest.batch_size=2",
           "harvest.num_actors=2", "store.chunk_tokens=64", "store.dtype=float32"]
# 300 steps of 64 rows, a checkpoint every 20: 15 checkpoints to land between.
TRAIN = ["sae.widths=[64,128]", "sae.k=4", "train.batch_size=64", f"train.tokens={64 * 300}",
         "train.checkpoint_every=20", "train.log_every=50"]
KINDS = ("actor-load", "actor-unit", "actor-write", "driver", "train-worker", "train-group",
         "ckpt-write", "member-write")
TIMEOUT = 600.0


@dataclass
class Outcome:
    fault: str
    moment: str
    completed: bool
    units_lost: int = 0
    units_duplicated: int = 0
    weight_mismatches: int = 0
    seconds: float = 0.0
    note: str = ""


def cli(stage: str, args: list[str]) -> list[str]:
    return [sys.executable, "-c", f"from distributed_sae.cli import {stage}_main; {stage}_main()",
            *args]


def env_with(fault: str = "") -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", TQDM_DISABLE="1")  # a test harness
    env.pop("DSAE_FAULT", None)
    if fault:
        env["DSAE_FAULT"] = fault
    return env


def start(cmd: list[str], log: Path, fault: str = "") -> subprocess.Popen:
    """`cmd` in its own process group (so the group can be killed), its output in `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env=env_with(fault), start_new_session=True, stdout=out,
                                stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, what: str) -> int:
    try:
        return proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise RuntimeError(f"{what} did not end in {TIMEOUT:.0f} s")


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_with_point(cmd: list[str], log: Path, run: Path, point: str, n: int,
                   what: str) -> tuple[int, bool]:
    """Run cmd with the fault point armed at its n-th pass; (exit code, whether it fired)."""
    proc = start(cmd, log, fault=f"{point}:{n}:{run / 'fired'}")
    rc = finish(proc, what)
    kill_group(proc)
    return rc, (run / "fired").exists()


def run_to_end(cmd: list[str], log: Path, what: str) -> None:
    proc = start(cmd, log)
    rc = finish(proc, what)
    kill_group(proc)  # Ray processes it left, if any
    if rc != 0:
        raise RuntimeError(f"{what} exited {rc}; see {log}")


def wait_for(cond, what: str, proc: subprocess.Popen | None = None) -> bool:
    """Poll `cond` until true (True) or `proc` ends first (False)."""
    deadline = time.time() + TIMEOUT
    while not cond():
        if proc is not None and proc.poll() is not None:
            return False
        if time.time() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return True


def commits(store: Path) -> int:
    return len(list((store / "_commits").glob("u*.json")))


def pids_of(prefix: str, session: int | None = None) -> list[int]:
    """Processes whose command line starts with `prefix` (Ray names actors `ray::<Class>`),
    only those of process-group session `session` when given."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "cmdline").read_bytes().startswith(prefix.encode()) and (
                    session is None or os.getsid(int(entry.name)) == session):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def compare_store(store: Path, clean: Path) -> tuple[int, int, str]:
    """(units lost, rows duplicated, note) of `store` against the clean store."""
    from distributed_sae.store import ActivationStore

    a, b = ActivationStore.open(store), ActivationStore.open(clean)
    rows = b.unit_rows
    lost = sum(1 for u in range(int(b.metadata["n_units"])) if u not in a.commits)
    ta, tb = a.tokens(0, a.n_tokens), b.tokens(0, b.n_tokens)
    va, ca = np.unique(ta, return_counts=True)
    vb, cb = np.unique(tb, return_counts=True)
    count_a = dict(zip(va.tolist(), ca.tolist()))
    dup = sum(max(0, c - dict(zip(vb.tolist(), cb.tolist())).get(v, 0)) for v, c in count_a.items())
    note = ""
    if a.n_tokens == b.n_tokens:
        diff = np.flatnonzero((ta != tb).reshape(-1, rows).any(axis=1))
        lost += len(diff)
        if not a.read(HOOK, 0, a.n_tokens).equal(b.read(HOOK, 0, b.n_tokens)):
            note = "activations differ"
    return lost, dup // rows if dup else 0, note


def compare_weights(out: Path, clean: Path) -> int:
    """Tensors of out's members that are not bit-identical to the clean run's (or missing)."""
    import torch
    from safetensors.torch import load_file

    bad = 0
    for ref in sorted((clean / "train").glob("*/sae_weights.safetensors")):
        mine = out / "train" / ref.parent.name / ref.name
        want = load_file(str(ref))
        got = load_file(str(mine)) if mine.exists() else {}
        bad += sum(1 for k, v in want.items() if k not in got or not torch.equal(v, got[k]))
    return bad


# ---- the faults: each returns the moment it hit, after running the job to its end ------------
class Campaign:
    def __init__(self, out: Path, seed: int) -> None:
        self.out, self.rng = out, random.Random(seed)
        self.model = out / "model"
        self.clean_store = out / "clean" / "store"

    def harvest_cmd(self, store: Path) -> list[str]:
        return cli("harvest", [f"model.name={self.model}", f"store.path={store}",
                               f"out_dir={store.parent}", *HARVEST])

    def train_cmd(self, out: Path, workers: int = 1) -> list[str]:
        return cli("train", [f"model.name={self.model}", f"store.path={self.clean_store}",
                             f"out_dir={out}", *HARVEST, *TRAIN, f"train.workers={workers}"])

    def prepare(self) -> None:
        """The model, the clean store and the clean trainings (one process, two Ray workers)."""
        if not (self.model / "config.json").exists():
            make_model(self.model)
        (self.out / "clean").mkdir(parents=True, exist_ok=True)
        for name, cmd in (("store", self.harvest_cmd(self.clean_store)),
                          ("train1", self.train_cmd(self.out / "clean" / "train1")),
                          ("train2", self.train_cmd(self.out / "clean" / "train2", workers=2))):
            done = self.out / "clean" / f".{name}_done"
            if not done.exists():
                run_to_end(cmd, self.out / "clean" / f"{name}.log", f"clean {name}")
                done.touch()

    def fresh(self, i: int, kind: str) -> Path:
        run = self.out / f"fault_{i:03d}_{kind}"
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        return run

    def kill_one(self, proc: subprocess.Popen, prefix: str, kind: str, log: Path) -> None:
        """SIGKILL one of the run's processes named prefix; the run must still end with 0."""
        os.kill(self.rng.choice(pids_of(prefix, os.getsid(proc.pid))), signal.SIGKILL)
        rc = finish(proc, kind)
        kill_group(proc)
        if rc != 0:
            raise RuntimeError(f"exit code {rc} after one {prefix} was killed; see {log}")

    def harvest_fault(self, run: Path, kind: str) -> str:
        store, log = run / "store", run / "harvest.log"
        cmd = self.harvest_cmd(store)
        if kind in ("actor-load", "actor-write"):
            n = 1 if kind == "actor-load" else self.rng.randint(1, UNITS // 4)
            point = "harvest_load" if kind == "actor-load" else "store_write"
            rc, fired = run_with_point(cmd, log, run, point, n, kind)
            if rc != 0:
                raise RuntimeError(f"harvest exited {rc} after the {kind} fault; see {log}")
            return f"{point} pass {n}" + ("" if fired else " (never reached)")
        c = self.rng.randint(1, UNITS // 2)
        proc = start(cmd, log)
        if not wait_for(lambda: commits(store) >= c, f"{c} commits", proc):
            return f"after {c} commits (the harvest ended first)"
        if kind == "actor-unit":
            self.kill_one(proc, "ray::HarvestWorker", kind, log)
        else:  # the driver alone; the Ray instance it started goes down with it or is killed
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kill_group(proc)
            run_to_end(cmd, log, "restarted harvest")
        return f"after {c} commits ({commits(store)} at the end)"

    def train_fault(self, run: Path, kind: str) -> str:
        log = run / "train.log"
        workers = 2 if kind == "train-worker" else 1
        cmd = self.train_cmd(run, workers)
        if kind in ("ckpt-write", "member-write"):
            n = self.rng.randint(1, 14) if kind == "ckpt-write" else self.rng.randint(1, 2)
            point = "checkpoint_write" if kind == "ckpt-write" else "member_write"
            rc, fired = run_with_point(cmd, log, run, point, n, kind)
            if not fired:
                return f"{point} pass {n} (never reached)"
            if rc == 0:
                raise RuntimeError(f"training exited 0 although the {point} fault fired")
            run_to_end(cmd, log, "restarted training")
            return f"{point} pass {n}"
        c = self.rng.randint(1, 12)
        proc = start(cmd, log)
        if not wait_for(lambda: latest_step(run) >= 20 * c,
                        f"checkpoint {c}", proc):
            return f"after checkpoint {c} (the training ended first)"
        if kind == "train-worker":
            self.kill_one(proc, "ray::RayTrainWorker", kind, log)
        else:
            kill_group(proc)
            run_to_end(cmd, log, "restarted training")
        return f"after step {20 * c}"

    def one(self, i: int, kind: str) -> Outcome:
        run, t0 = self.fresh(i, kind), time.time()
        try:
            if kind.startswith(("actor", "driver")):
                moment = self.harvest_fault(run, kind)
                lost, dup, note = compare_store(run / "store", self.clean_store)
                return Outcome(kind, moment, True, lost, dup, 0, time.time() - t0, note)
            moment = self.train_fault(run, kind)
            clean = self.out / "clean" / ("train2" if kind == "train-worker" else "train1")
            return Outcome(kind, moment, True, 0, 0, compare_weights(run, clean),
                           time.time() - t0)
        except RuntimeError as err:
            return Outcome(kind, "", False, seconds=time.time() - t0, note=str(err))


def latest_step(run: Path) -> int:
    steps = [int(p.name.split("_")[1]) for p in (run / "train" / "checkpoints").glob("step_*")]
    return max(steps, default=0)


def make_model(path: Path) -> None:
    """A 3-layer, 32-wide random Llama saved with SmolLM2's real tokenizer (tests' tiny model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from distributed_sae.config import ModelConfig
    from distributed_sae.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True)
    path.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def table(outcomes: list[Outcome]) -> str:
    lines = [f"{'#':>3} {'fault':<13} {'moment':<38} {'done':<5} {'lost':>4} {'dup':>4} "
             f"{'w.mis':>5} {'s':>6}  note"]
    for i, o in enumerate(outcomes):
        lines.append(f"{i:>3} {o.fault:<13} {o.moment[:38]:<38} {str(o.completed):<5} "
                     f"{o.units_lost:>4} {o.units_duplicated:>4} {o.weight_mismatches:>5} "
                     f"{o.seconds:>6.1f}  {o.note}")
    done = sum(o.completed for o in outcomes)
    lines.append(f"faults injected {len(outcomes)}, runs completed {done}, units lost "
                 f"{sum(o.units_lost for o in outcomes)}, units duplicated "
                 f"{sum(o.units_duplicated for o in outcomes)}, weight mismatches "
                 f"{sum(o.weight_mismatches for o in outcomes)}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="draws the moments (and the kinds' order)")
    ap.add_argument("--count", type=int, default=20, help="faults to inject, over the kinds in turn")
    ap.add_argument("--kinds", nargs="*", default=list(KINDS), choices=KINDS)
    ap.add_argument("--out", default="/tmp/dsae_campaign", help="work folder (clean runs are kept)")
    ap.add_argument("--json", default="", help="also write the outcomes here")
    args = ap.parse_args()
    campaign = Campaign(Path(args.out), args.seed)
    campaign.prepare()
    outcomes = []
    for i in range(args.count):
        outcomes.append(campaign.one(i, args.kinds[i % len(args.kinds)]))
        print(table(outcomes).splitlines()[-2], flush=True)
    text = table(outcomes)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"seed": args.seed, "count": args.count,
                                               "outcomes": [asdict(o) for o in outcomes]},
                                              indent=1) + "\n")
    bad = [o for o in outcomes if not o.completed or o.units_lost or o.units_duplicated
           or o.weight_mismatches or o.note]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
