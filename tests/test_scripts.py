"""The data scripts: check_videos, prepare_ssv2, prepare_k400, benchmark_loader (on tiny files)."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import av
import pytest
from helpers.processes import children_of, kill_all, wait_gone
from helpers.videos import write_video
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"


def load_script(name: str):
    """Import scripts/<name>.py as a module (the scripts are not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and process pools look modules up by name
    spec.loader.exec_module(module)
    return module


def probe(path: Path) -> tuple[int, int, int, str]:
    """(frames decoded, height, width, codec) of a video, read with PyAV."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f for f in container.decode(stream)]
        return len(frames), frames[0].height, frames[0].width, stream.codec_context.name


def read_report(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {Path(row["path"]).name: row for row in csv.DictReader(f)}


# --- check_videos ----------------------------------------------------------------------------


@pytest.fixture
def video_folder(tmp_path, bad_videos):
    """A folder with good, broken, missing and hanging videos, and a list naming them all."""
    folder = bad_videos["zero"].parent
    write_video(folder / "good.mp4", num_frames=20)
    write_video(folder / "good.webm", num_frames=14)
    # Opening a FIFO blocks until someone writes to it: a decoder that hangs in C.
    os.mkfifo(folder / "hang.mp4")
    names = [
        "good.mp4",
        "zero.mp4",
        "good.webm",
        "text.mp4",
        "truncated.mp4",
        "truncated_faststart.mp4",
        "absent.mp4",
        "hang.mp4",
    ]
    list_file = folder / "videos.txt"
    list_file.write_text("# a comment stays\n" + "".join(f"{name} {i % 3}\n" for i, name in enumerate(names)))
    return folder, list_file


EXPECTED_STATUS = {
    "good.mp4": "ok",
    "good.webm": "ok",
    "zero.mp4": "corrupt",
    "text.mp4": "corrupt",
    "truncated.mp4": "corrupt",
    "truncated_faststart.mp4": "corrupt",
    "absent.mp4": "missing",
    "hang.mp4": "timeout",
}


def test_check_videos_list(video_folder, tmp_path):
    check_videos = load_script("check_videos")
    folder, list_file = video_folder
    out = tmp_path / "out"
    summary = check_videos.main(["--list", str(list_file), "--out-dir", str(out), "--workers", "2", "--timeout", "4"])
    report = read_report(out / "report_videos.csv")
    assert {name: row["status"] for name, row in report.items()} == EXPECTED_STATUS
    assert report["good.mp4"]["num_frames"] == "20" and report["good.webm"]["num_frames"] == "14"
    assert "killed" in report["hang.mp4"]["error"]
    assert summary["counts"] == {"ok": 2, "missing": 1, "corrupt": 4, "timeout": 1}
    # The clean list keeps the input's lines (labels, comment) for the good videos only.
    assert (out / "clean_videos.txt").read_text() == "# a comment stays\ngood.mp4 0\ngood.webm 2\n"


def test_check_videos_report_guards_formula_cells(tmp_path):
    # A file named like a formula must not run when the report is opened in a spreadsheet.
    check_videos = load_script("check_videos")
    evil = "@SUM(1+1)*cmd|' /C calc'!A0"
    check_videos.write_report([check_videos.Result(path=evil, status="missing", num_frames=-1)], tmp_path / "r.csv")
    with open(tmp_path / "r.csv", newline="") as f:
        assert list(csv.reader(f))[1][:3] == ["'" + evil, "missing", "-1"]


def test_check_videos_config_json_report(video_folder, tmp_path):
    check_videos = load_script("check_videos")
    folder, list_file = video_folder
    (folder / "hang.mp4").unlink()
    out = tmp_path / "out"
    check_videos.main(
        [
            "--config-overrides",
            "dataset=list",
            f"dataset.root={folder}",
            f"dataset.val_file={list_file}",
            "dataset.num_classes=3",
            "--split",
            "val",
            "--out-dir",
            str(out),
            "--workers",
            "1",
            "--report-format",
            "json",
            "--decoder",
            "pyav",
            "--fallback-decoder",
            "none",
            "--frames",
            "4",
        ]
    )
    rows = {Path(r["path"]).name: r for r in json.loads((out / "report_val.json").read_text())}
    expected = {name: status for name, status in EXPECTED_STATUS.items() if name != "hang.mp4"}
    expected["hang.mp4"] = "missing"
    assert {name: row["status"] for name, row in rows.items()} == expected
    assert rows["good.webm"]["decoder"] == "pyav"
    assert (out / "clean_videos.txt").read_text() == "# a comment stays\ngood.mp4 0\ngood.webm 2\n"


def test_check_videos_takes_the_decode_settings_of_the_config(video_folder, tmp_path, caplog):
    check_videos = load_script("check_videos")
    folder, _ = video_folder
    good = folder / "good.txt"
    good.write_text("good.mp4 0\ngood.webm 1\n")
    overrides = [
        "dataset=list",
        f"dataset.root={folder}",
        f"dataset.val_file={good}",
        "dataset.num_classes=2",
        "dataset.fallback_decoder=null",
    ]
    args = ["--out-dir", str(tmp_path / "out"), "--workers", "1", "--frames", "4"]
    # A deliberate decode_timeout: 0 (unguarded, as the synthetic dataset trains) is kept, not replaced by 60 s.
    with caplog.at_level(logging.INFO):
        summary = check_videos.main(["--config-overrides", *overrides, "dataset.decode_timeout=0", *args])
    assert "unguarded decoding" in caplog.text and summary["counts"]["ok"] == 2
    caplog.clear()
    with caplog.at_level(logging.INFO):  # a bare list: the keys every dataset config has (decode_timeout 60)
        check_videos.main(["--list", str(good), *args])
    base = OmegaConf.load(REPO / "squarefuse" / "config" / "defaults" / "dataset" / "base.yaml")
    assert f"{base.decode_timeout:g} s per decoder call" in caplog.text and base.decoder in caplog.text


def test_check_videos_cleans_k400_and_ssv2_formats(tmp_path):
    check_videos = load_script("check_videos")
    k400_csv = tmp_path / "val.csv"
    k400_csv.write_text(
        'label,youtube_id,time_start,time_end,split\n"dancing, ballet",abc,14.0,24.0,val\njuggling,xyz,3,13,val\n'
    )
    split = check_videos.Split(
        "val", k400_csv, "k400", paths=["a", "b"], ids=["abc_000014_000024", "xyz_000003_000013"]
    )
    assert check_videos.write_clean(split, {"xyz_000003_000013"}, tmp_path / "clean.csv") == 1
    with open(tmp_path / "clean.csv", newline="") as f:
        assert list(csv.reader(f)) == [
            ["label", "youtube_id", "time_start", "time_end", "split"],
            ["juggling", "xyz", "3", "13", "val"],
        ]

    ssv2_json = tmp_path / "validation.json"
    ssv2_json.write_text(json.dumps([{"id": "7", "template": "a"}, {"id": "9", "template": "b"}]))
    split = check_videos.Split("val", ssv2_json, "ssv2", paths=["a", "b"], ids=["7", "9"])
    assert check_videos.write_clean(split, {"7"}, tmp_path / "clean.json") == 1
    assert json.loads((tmp_path / "clean.json").read_text()) == [{"id": "7", "template": "a"}]


# --- prepare_ssv2 ------------------------------------------------------------------------------


def test_prepare_ssv2_reports_layout_and_reencodes(tmp_path):
    prepare_ssv2 = load_script("prepare_ssv2")
    root = tmp_path / "ssv2"
    (root / "annotations").mkdir(parents=True)
    labels = {"Pushing something from left to right": "0", "Moving something up": "1"}
    (root / "annotations" / "something-something-v2-labels.json").write_text(json.dumps(labels))
    train = [
        {"id": "1", "template": "Pushing [something] from left to right"},
        {"id": "2", "template": "Moving [something] up"},
        {"id": "3", "template": "Moving [something] up"},
    ]
    (root / "annotations" / "something-something-v2-train.json").write_text(json.dumps(train))
    validation = [{"id": "4", "template": "Moving [something] up"}]
    (root / "annotations" / "something-something-v2-validation.json").write_text(json.dumps(validation))
    write_video(root / "videos" / "1.webm", num_frames=25, width=64, height=48, fps=12)
    write_video(root / "videos" / "2.webm", num_frames=13, width=63, height=48, fps=12)  # odd width
    write_video(root / "videos" / "4.webm", num_frames=10, width=64, height=48, fps=12)

    result = prepare_ssv2.main(["--root", str(root), "--reencode", "--workers", "2"])
    assert result["layout"]["train"] == {
        "annotated": 3,
        "present": 2,
        "missing": 1,
        "classes": 2,
        "missing_examples": [str(root / "videos" / "3.webm")],
    }
    assert result["layout"]["validation"]["missing"] == 0
    assert result["reencode"] == {"done": 3, "skipped": 0, "failed": 0}
    assert f"dataset.video_dir={root / 'videos_mp4'}" in result["overrides"]
    assert "dataset.video_ext=mp4" in result["overrides"]
    for video_id, frames, width in (("1", 25, 64), ("2", 13, 64), ("4", 10, 64)):
        num_frames, height, out_width, codec = probe(root / "videos_mp4" / f"{video_id}.mp4")
        assert codec == "h264" and height == 48 and out_width == width
        assert abs(num_frames - frames) <= 1
    assert not list((root / "videos_mp4").glob(".*partial"))

    again = prepare_ssv2.main(["--root", str(root), "--reencode", "--workers", "1"])
    assert again["reencode"] == {"done": 0, "skipped": 3, "failed": 0}


# --- prepare_k400 ------------------------------------------------------------------------------


def test_prepare_k400_names_trims_and_resizes(tmp_path):
    prepare_k400 = load_script("prepare_k400")
    source = tmp_path / "downloads"
    # A full download named by YouTube id (8 s at 10 fps) and an already-trimmed clip in a
    # class folder, in VP9, with the official name.
    write_video(source / "full" / "abc-DEF_123.mp4", num_frames=80, width=96, height=64, fps=10)
    write_video(source / "juggling balls" / "xyz_000003_000013.webm", num_frames=12, width=64, height=80, fps=10)
    csv_file = tmp_path / "validate.csv"
    csv_file.write_text(
        "label,youtube_id,time_start,time_end,split\n"
        '"dancing, ballet",abc-DEF_123,2.0,5.0,val\n'
        "juggling balls,xyz,3,13,val\n"
        "juggling balls,gone,0,10,val\n"
    )
    out = tmp_path / "k400"
    counts = prepare_k400.main(
        ["--csv", str(csv_file), "--source", str(source), "--out", str(out), "--short-side", "32", "--workers", "2"]
    )
    assert counts == {"done": 2, "skipped": 0, "missing": 1, "failed": 0}
    videos = sorted(p.name for p in (out / "videos" / "val").iterdir())
    assert videos == ["abc-DEF_123_000002_000005.mp4", "xyz_000003_000013.mp4"]
    # The trimmed download: 3 s of a 10 fps video, short side 32 (96x64 -> 48x32).
    num_frames, height, width, codec = probe(out / "videos" / "val" / "abc-DEF_123_000002_000005.mp4")
    assert (height, width, codec) == (32, 48, "h264") and abs(num_frames - 30) <= 1
    num_frames, height, width, _ = probe(out / "videos" / "val" / "xyz_000003_000013.mp4")
    assert (height, width) == (40, 32) and abs(num_frames - 12) <= 1
    assert (out / "missing_val.txt").read_text() == "gone_000000_000010\n"
    with open(out / "annotations" / "val.csv", newline="") as f:
        assert [row[1] for row in csv.reader(f)] == ["youtube_id", "abc-DEF_123", "xyz", "gone"]

    again = prepare_k400.main(
        ["--csv", str(csv_file), "--source", str(source), "--out", str(out), "--short-side", "32"]
    )
    assert again == {"done": 0, "skipped": 2, "missing": 1, "failed": 0}


# --- benchmark_loader --------------------------------------------------------------------------


def test_benchmark_loader_quick(tmp_path, capsys):
    benchmark_loader = load_script("benchmark_loader")
    results = benchmark_loader.main(["--quick", "--json", "--profile", "--work-dir", str(tmp_path)])
    assert set(results) == {"k400", "ssv2"}
    printed = json.loads(capsys.readouterr().out)
    assert printed == results
    for r in results.values():
        assert r["raw_decode_clips_s"] > 0 and r["pipeline_clips_s"] > 0
        assert len(r["rounds_raw"]) == len(r["rounds_pipeline"]) == 2
        paired = sorted(p / q for p, q in zip(r["rounds_pipeline"], r["rounds_raw"], strict=True))
        assert r["ratio"] == pytest.approx(sum(paired) / 2, rel=0.02)  # the median of two rounds
        steps = r["ms_per_decoded_clip"]
        assert "decode (open excluded)" in steps and any("RandomResizedCrop" in s for s in steps)
    # The recipes are the dataset configs': flip for K400, never for SSv2.
    assert any("HorizontalFlip" in s for s in results["k400"]["ms_per_decoded_clip"])
    assert not any("HorizontalFlip" in s for s in results["ssv2"]["ms_per_decoded_clip"])
    # The test videos are what the benchmark claims: H.264 and VP9 at the quick sizes.
    assert probe(tmp_path / "k400.mp4")[1:] == (120, 160, "h264")
    assert probe(tmp_path / "ssv2.webm")[1:] == (80, 142, "vp9")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads child processes from /proc")
def test_pool_workers_die_with_a_killed_script():
    # A script killed with SIGKILL runs no clean-up: its workers would stay blocked on the task queue.
    script = (
        "import sys, time\n"
        "from squarefuse.runtime.process_pool import video_process_pool\n"
        "pool = video_process_pool(2)\n"
        "futures = [pool.submit(time.sleep, 600) for _ in range(2)]\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n"
    )
    caller = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        assert caller.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30
        while len(workers) < 2 and time.monotonic() < deadline:
            workers = children_of(caller.pid)
            time.sleep(0.05)
        assert len(workers) >= 2, workers
        caller.kill()
        caller.wait()
        assert wait_gone(workers, timeout=5) == []
    finally:
        caller.kill()
        kill_all(workers)
