"""A plain `pip install .` ships conf/ and recipes/; `p3d ls` lists them; checkpoints count only when complete."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from p3d.checkpoint import COMPLETE_MARKER, complete_checkpoints


def test_wheel_carries_configs_and_recipes(tmp_path):
    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(root), "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("p3d-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "p3d/_conf/config.yaml" in names
    assert "p3d/_conf/parallel/default.yaml" in names
    assert "p3d/_conf/model/opt1.3b.yaml" in names
    assert "p3d/_recipes/tiny_llama_3d.yaml" in names
    assert any(name.endswith("entry_points.txt") for name in names)


def test_p3d_ls_lists_groups_presets_and_recipes():
    done = subprocess.run([sys.executable, "-m", "p3d.cli", "ls"], capture_output=True, text=True, check=True)
    for expected in ("model:", "tiny_llama", "tiny_opt", "opt1.3b", "parallel:", "default", "tp{T}dp{D}cp{C}", "recipe", "tiny_llama_3d"):
        assert expected in done.stdout


def test_incomplete_checkpoints_are_never_latest(tmp_path):
    for step in (5, 10, 15):
        (tmp_path / f"step_{step:08d}").mkdir()
    (tmp_path / "step_00000005" / COMPLETE_MARKER).write_text("{}")
    (tmp_path / "step_00000010" / COMPLETE_MARKER).write_text("{}")
    found = complete_checkpoints(tmp_path)  # step 15 has no marker: a save that died
    assert [step for step, _ in found] == [5, 10] and found[-1][1] == tmp_path / "step_00000010"


def test_p3d_ls_lists_a_config_dirs_presets_first(tmp_path):
    from tests.unit.test_config import user_config_dir

    mine = user_config_dir(tmp_path / "mine")
    done = subprocess.run([sys.executable, "-m", "p3d.cli", "ls", "--config-dir", str(mine)], capture_output=True, text=True, check=True)
    assert "  user_llama             mine" in done.stdout and "  wide                   all data-parallel, 4 ranks" in done.stdout
    assert "  user_run" in done.stdout.split("recipe (select with +recipe=NAME):")[1]
