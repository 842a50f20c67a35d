"""Disk full: a harvest and a training each run out of room on a small tmpfs, stop with one line
(exit 2), and after the tmpfs is grown the same command resumes to the clean run's result.

    sudo python scripts/check_disk_full.py [--out /tmp/dsae_campaign]   (mounts tmpfs: root)

Uses the fault campaign's tiny model and clean runs (scripts/fault_campaign.py; made if missing).
Prints each stage's message, exit code and the comparison with the clean run; exit 1 on any
mismatch.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from fault_campaign import Campaign, compare_store, compare_weights, env_with, kill_group

# The clean store is 2.7 MB (20480 rows x 32 float32 + token ids): 1 MiB fills during the harvest.
# A checkpoint of the two tiny members with Adam state is ~0.2 MB, and keep_checkpoints=2 plus
# the staging folder need ~0.6 MB: 384 KiB fills during training.
STAGES = (("harvest", "1m"), ("train", "384k"))


def mount(path: Path, size: str, remount: bool = False) -> None:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"remount,size={size}" if remount else f"size={size}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)


def run(cmd: list[str], log: Path) -> tuple[int, list[str]]:
    """Run to the end; (exit code, its ERROR lines)."""
    proc = subprocess.Popen(cmd, env=env_with(), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=600)
    kill_group(proc)
    log.write_text(out)
    return proc.returncode, [line for line in out.splitlines() if "[ERROR]" in line]


def one(campaign: Campaign, stage: str, size: str) -> bool:
    disk = campaign.out / f"tmpfs_{stage}"
    mount(disk, size)
    try:
        if stage == "harvest":
            cmd = campaign.harvest_cmd(disk / "store")
        else:
            cmd = campaign.train_cmd(disk)
        rc, errors = run(cmd, campaign.out / f"diskfull_{stage}_1.log")
        print(f"{stage} on a {size} tmpfs: exit {rc}, {len(errors)} error line(s)")
        for line in errors:
            print("   ", line)
        mount(disk, "64m", remount=True)  # grown in place: what was written stays
        rc2, errors2 = run(cmd, campaign.out / f"diskfull_{stage}_2.log")
        if stage == "harvest":
            lost, dup, note = compare_store(disk / "store", campaign.clean_store)
            same = not (lost or dup or note)
            print(f"  rerun on 64 MiB: exit {rc2}; units lost {lost}, duplicated {dup} {note}")
        else:
            bad = compare_weights(disk, campaign.out / "clean" / "train1")
            same = bad == 0
            print(f"  rerun on 64 MiB: exit {rc2}; weight mismatches {bad}")
        return rc == 2 and len(errors) == 1 and "disk full" in errors[0] and rc2 == 0 and same
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/dsae_campaign")
    args = ap.parse_args()
    campaign = Campaign(Path(args.out), seed=0)
    campaign.prepare()
    ok = [one(campaign, stage, size) for stage, size in STAGES]
    print("disk-full runs:", "all resumed to the clean result" if all(ok) else f"FAILED {ok}")
    sys.exit(0 if all(ok) else 1)


if __name__ == "__main__":
    main()
