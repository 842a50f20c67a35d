"""Overrides that fail while composing (unknown key, wrong type, unknown preset, unparsable) are
one line naming the override, exit 2, before Hydra runs anything (Hydra alone prints five lines
and exits 1)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from distributed_sae.config import ConfigError
from distributed_sae.config.overrides import check_overrides, user_overrides
from distributed_sae.config.register import register_configs
from conftest import HANG_S


@pytest.mark.parametrize("override, fragments", [
    ("sae.seed=abc", ["sae.seed=abc", "'abc'", "Integer"]),
    ("train.holdout_fraction=half", ["train.holdout_fraction=half", "Float"]),
    ("data.prepend_bos=maybe", ["data.prepend_bos=maybe", "not a valid bool"]),
    ("sae.widths=[a,b]", ["sae.widths=[a,b]", "Integer"]),
    ("nosuch.key=1", ["'nosuch.key'", "+nosuch.key=1"]),
    ("train.nosuch=1", ["'train.nosuch'"]),
    ("sae=nosuchpreset", ["'sae/nosuchpreset'", "Available options in 'sae':", "topk,"]),
    ("sae.widths=[a", ["cannot parse the override 'sae.widths=[a'"]),
])
def test_a_bad_override_is_one_line_naming_it(override, fragments):
    register_configs()
    with pytest.raises(ConfigError) as err:
        check_overrides(["out_dir=/tmp/unused", override])
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_good_overrides_pass_and_flags_are_left_to_hydra():
    register_configs()
    check_overrides(["sae.widths=[16,32]", "sae.k=4"])
    assert user_overrides(["-m", "sae.k=16,32"]) is None  # a sweep does not compose as one job
    assert user_overrides(["--cfg", "job"]) is None
    assert user_overrides(["sae.k=4", "hydra.run.dir=/x", "+hydra/launcher=basic"]) == ["sae.k=4"]


def test_the_entry_point_exits_2_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "from distributed_sae.cli import train_main; train_main()",
         "sae.seed=abc", f"out_dir={tmp_path}/o"],
        capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and "sae.seed=abc" in errors[0], proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
