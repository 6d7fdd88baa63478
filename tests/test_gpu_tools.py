"""Tools of the GPU run: the wheel slimmer and the learning-curve report."""
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from gpu_learning_curve import main as curve_main  # noqa: E402
from gpu_learning_curve import summarise  # noqa: E402
from slim_wheel import slim_wheel  # noqa: E402

FILES = {
    "toy/__init__.py": b"",
    "toy/assets/objects/box.xml": b'<texture name="T" type="cube" file="../textures/used.png"/>',
    "toy/assets/textures/used.png": b"\x89PNG used",
    "toy/assets/textures/unused.png": b"\x89PNG unused" * 100,
    "toy/assets/scene/used.png": b"\x89PNG same name elsewhere",
    "toy/assets/scene/skybox.jpg": b"JPEG unused",
}


def make_wheel(directory: Path) -> Path:
    path = directory / "toy-1.0-py3-none-any.whl"
    record = "".join(f"{name},,\n" for name in FILES) + "toy-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in FILES.items():
            archive.writestr(name, data)
        archive.writestr("toy-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: toy\nVersion: 1.0\n")
        archive.writestr("toy-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr("toy-1.0.dist-info/RECORD", record)
    return path


def test_slim_wheel_drops_only_images_no_text_names_and_still_installs(tmp_path):
    wheel = make_wheel(tmp_path)
    before, after, dropped = slim_wheel(str(wheel))
    assert dropped == 2 and after < before
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        record = archive.read("toy-1.0.dist-info/RECORD").decode()
        kept = {name: archive.read(name) for name in FILES if name in names}
    assert set(FILES) - names == {"toy/assets/textures/unused.png", "toy/assets/scene/skybox.jpg"}
    assert kept == {name: data for name, data in FILES.items() if name in kept}
    assert "unused.png" not in record and "skybox.jpg" not in record and "toy/assets/textures/used.png" in record
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target), str(wheel)],
        check=True, capture_output=True,
    )
    assert (target / "toy/assets/textures/used.png").read_bytes() == FILES["toy/assets/textures/used.png"]
    assert not (target / "toy/assets/textures/unused.png").exists()


def write_csv(path: Path, rows: list[tuple[int, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{step},{value}\n" for step, value in rows))


def test_learning_curve_keeps_last_value_per_step_and_sums_segments(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    # 4000 logged twice: a segment logged it, was killed before its checkpoint, and the
    # resumed segment logged it again
    write_csv(run / "scalars/eval/success_mean.csv", [(2000, 0.1), (4000, 0.2), (4000, 0.3), (6000, 0.5)])
    write_csv(run / "scalars/eval/return_mean.csv", [(2000, 10.0), (4000, 12.0), (6000, 15.0)])
    write_csv(run / "scalars/train/loss_actor.csv", [(2200, -1.0), (6400, -2.0)])
    (run / "segments.csv").write_text("2026-11-01T10:00:00Z,400,124\n2026-11-01T10:20:00Z,380,124\n")
    summary = summarise(run)
    assert summary["evaluations"]["success_mean"] == {"frames": [2000.0, 4000.0, 6000.0], "values": [0.1, 0.3, 0.5]}
    assert summary["frames_at_last_update_log"] == 6400.0
    assert summary["wall_seconds"] == 780.0 and [s["exit_code"] for s in summary["segments"]] == [124, 124]
    monkeypatch.setattr(sys, "argv", ["gpu_learning_curve.py", str(run), "--out", str(tmp_path / "out")])
    curve_main()
    assert (tmp_path / "out/learning_curve.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((tmp_path / "out/learning.json").read_text())["wall_seconds"] == 780.0
    assert "success 0.500 at 6000 frames" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["gpu_learning_curve.py", str(tmp_path), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit):
        curve_main()
