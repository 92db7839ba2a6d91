"""Annotation files as people really save them: a byte-order mark, latin-1 bytes, a line twice, a typo'd label.

Each case must read correctly or fail with a ValueError that names the file and the line; none may
drop a video, count one twice or build a class list that exhausts the host's memory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from squarefuse.datasets.annotations import (
    MAX_CLASSES,
    list_num_classes,
    load_k400,
    load_list,
    load_ssv2,
    read_k400_csv,
    read_label_map,
)
from squarefuse.datasets.formats import find_format
from squarefuse.datasets.inputs import find_videos

BOM = "\ufeff"
K400_HEADER = "label,youtube_id,time_start,time_end,split\n"


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def test_a_label_too_large_for_a_class_id_names_file_and_line(tmp_path):
    # 1 + 99999999999 classes would have been built from this list without a label map.
    train = _write(tmp_path / "train.txt", "videos/a.webm 0\nvideos/x.webm 99999999999\n")
    with pytest.raises(ValueError, match=re.escape(f"{train}:2: label 99999999999 is not a class id")):
        list_num_classes(train)
    assert list_num_classes(_write(tmp_path / "ok.txt", f"a.webm {MAX_CLASSES - 1}\n")) == MAX_CLASSES


def test_the_configured_class_count_is_bounded(tmp_path):
    train = _write(tmp_path / "train.txt", "a.webm 0\n")
    cfg = OmegaConf.create({"name": "list", "train_file": str(train), "label_map": None, "num_classes": 10**11})
    with pytest.raises(ValueError, match=r"dataset.num_classes=100000000000: must be 1 to 100000"):
        find_format("list").load(cfg, "train")


def test_a_time_that_is_not_finite_names_file_and_line(tmp_path):
    csv_file = _write(tmp_path / "val.csv", K400_HEADER + "abseiling,aaa,1,11,val\nabseiling,bbb,inf,1e999,val\n")
    with pytest.raises(ValueError, match=re.escape(f"{csv_file}:3: time_start/time_end must be numbers")):
        read_k400_csv(csv_file)


def test_a_byte_order_mark_is_not_part_of_the_first_name(tmp_path):
    videos = tmp_path / "videos"
    records = load_list(
        list_file=_write(tmp_path / "train.txt", BOM + "v0.mp4 0\nv1.mp4 1\n"), video_dir=videos, class_names=["a", "b"]
    ).records
    assert [r.path for r in records] == [str(videos / "v0.mp4"), str(videos / "v1.mp4")]
    assert list_num_classes(tmp_path / "train.txt") == 2
    assert read_label_map(_write(tmp_path / "classes.txt", BOM + "cat\ndog\n")) == ["cat", "dog"]

    csv_file = _write(tmp_path / "train.csv", BOM + K400_HEADER + "abseiling,aaa,1,11,train\n")
    assert [row.label for row in read_k400_csv(csv_file)[1]] == ["abseiling"]

    labels = _write(tmp_path / "labels.json", BOM + json.dumps({"Holding something": "0"}))
    train_json = _write(tmp_path / "train.json", BOM + json.dumps([{"id": "7", "template": "Holding [something]"}]))
    ssv2 = load_ssv2(labels_file=labels, annotation_file=train_json, video_dir=videos, video_ext="webm")
    assert [(r.id, r.label) for r in ssv2.records] == [("7", 0)]


@pytest.mark.parametrize("line", [2, 3])
def test_a_byte_that_is_not_utf8_names_file_and_line(tmp_path, line):
    lines = ["v0.mp4 0", "v1.mp4 1", "v2.mp4 1"]
    lines[line - 1] = "caf\u00e9.mp4 0"
    train = _write(tmp_path / "train.txt", "\n".join(lines) + "\n", encoding="latin-1")
    for read in (list_num_classes, read_label_map, read_k400_csv):
        with pytest.raises(ValueError, match=re.escape(f"{train}:{line}: byte 0xe9 is not UTF-8")):
            read(train)


def test_a_video_listed_twice_is_refused(tmp_path):
    train = _write(tmp_path / "train.txt", "v0.mp4 0\nv1.mp4 1\n\nv0.mp4 0\n")
    with pytest.raises(ValueError, match=re.escape(f"{train}: v0.mp4 is listed twice (lines 1 and 4)")):
        load_list(list_file=train, video_dir=None, class_names=["a", "b"])

    csv_file = _write(tmp_path / "val.csv", K400_HEADER + "abseiling,aaa,1,11,val\nabseiling,aaa,1.0,11.0,val\n")
    twice = f"{csv_file}: clip aaa_000001_000011 is listed twice (lines 2 and 3)"
    with pytest.raises(ValueError, match=re.escape(twice)):
        load_k400(
            annotation_file=csv_file, class_names=["abseiling"], video_dir=tmp_path, video_ext="mp4", layout="flat"
        )

    labels = _write(tmp_path / "labels.json", json.dumps({"Holding something": "0"}))
    entries = [{"id": i, "template": "Holding [something]"} for i in ("7", "8", "7")]
    val_json = _write(tmp_path / "val.json", json.dumps(entries))
    with pytest.raises(ValueError, match=re.escape(f"{val_json}: id 7 is listed twice (entries 0 and 2)")):
        load_ssv2(labels_file=labels, annotation_file=val_json, video_dir=tmp_path, video_ext="webm")


def test_predict_input_lists_read_a_byte_order_mark_and_name_a_bad_byte(tmp_path):
    videos = find_videos(_write(tmp_path / "mine.txt", BOM + "v0.mp4\nv1.mp4 1\n"))
    assert [r.path for r in videos] == [str(tmp_path / "v0.mp4"), str(tmp_path / "v1.mp4")]
    bad = _write(tmp_path / "bad.txt", "v0.mp4\ncaf\u00e9.mp4\n", encoding="latin-1")
    with pytest.raises(ValueError, match=re.escape(f"{bad}:2: byte 0xe9 is not UTF-8")):
        find_videos(bad)
