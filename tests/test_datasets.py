"""Datasets end to end on files the tests write: annotations, missing and broken videos, configs."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
from helpers.configs import compose_config
from helpers.videos import write_video
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from squarefuse.datasets import build_dataset
from squarefuse.datasets.formats import FORMATS, find_format

T = 4
CROP = 32


def cfg_for(**overrides):
    """A complete dataset config (as the yaml files have it), small for tests."""
    cfg = {
        "name": "list",
        "root": None,
        "num_frames": T,
        "sampling": "segment",
        "stride": 2,
        "short_video": "pad",
        "decoder": "decord",
        "fallback_decoder": "pyav",
        "decode_timeout": 20,
        "decode_short_side": "auto",
        "decode_device": "cpu",
        "max_replacements": 10,
        "max_missing_fraction": 0.5,
        "crop_size": CROP,
        "eval_short_side": None,
        "test_clips": 2,
        "test_crops": 3,
        "hflip": False,
        "scale": [0.5, 1.0],
        "ratio": [0.75, 1.3333],
        "randaug_n": 0,
        "randaug_m": 0,
        "random_erasing": 0.0,
        "augment_on_device": False,
        "repeated_aug": 1,
        "label_map": None,
        "num_classes": None,
    }
    cfg.update(overrides)
    return OmegaConf.create(cfg)


# --- annotation trees in the official layouts (the defaults of configs/dataset/*.yaml) ----------

SSV2_LABELS = {  # ids deliberately not in alphabetical order
    "Pushing something from right to left": "0",
    "Pushing something from left to right": "1",
    "Holding something": "2",
}


def make_ssv2(root: Path) -> Path:
    (root / "annotations").mkdir(parents=True)
    (root / "videos").mkdir()
    train = [
        {"id": "11", "label": "pushing a cup from left to right", "template": "Pushing [something] from left to right"},
        {"id": "12", "label": "holding a pen", "template": "Holding [something]", "placeholders": ["a pen"]},
        {"id": "13", "label": "pushing a box from right to left", "template": "Pushing [something] from right to left"},
    ]
    val = [{"id": "21", "label": "holding a cup", "template": "Holding [something]", "placeholders": ["a cup"]}]
    for name, data in (("labels", SSV2_LABELS), ("train", train), ("validation", val)):
        (root / "annotations" / f"something-something-v2-{name}.json").write_text(json.dumps(data))
    for entry in train + val:
        write_video(root / "videos" / f"{entry['id']}.webm", num_frames=16, width=40, height=32)
    return root


K400_TRAIN = """label,youtube_id,time_start,time_end,split
"riding a bike, fast",bbb,0,10,train
passing American football (in game),aaa,14.0,24.0,train
abseiling,ccc,5,15,train
"""
K400_VAL = """label,youtube_id,time_start,time_end,split
abseiling,ddd,1,11,val
"riding a bike, fast",eee,2.0,12.0,val
"""
K400_CLASSES = ["abseiling", "passing American football (in game)", "riding a bike, fast"]


def make_k400(root: Path) -> Path:
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "train.csv").write_text(K400_TRAIN)
    (root / "annotations" / "val.csv").write_text(K400_VAL)
    # train is flat, val has one folder per class (label with "_" for spaces)
    for name in ("bbb_000000_000010", "aaa_000014_000024", "ccc_000005_000015"):
        write_video(root / "videos" / "train" / f"{name}.mp4", num_frames=20, width=40, height=32)
    for folder, name in (("abseiling", "ddd_000001_000011"), ("riding_a_bike,_fast", "eee_000002_000012")):
        (root / "videos" / "val" / folder).mkdir(parents=True, exist_ok=True)
        write_video(root / "videos" / "val" / folder / f"{name}.mp4", num_frames=20, width=40, height=32)
    return root


def make_list(root: Path, entries: list[tuple[str, int]], *, split: str = "train") -> Path:
    """Videos named by `entries` (path, label) under root, written unless the path says 'missing'."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for rel, label in entries:
        if "missing" not in rel and not (root / rel).exists():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            write_video(root / rel, num_frames=12, width=40, height=32)
        lines.append(f"{rel} {label}")
    (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def compose_dataset(name: str, *overrides: str):
    return compose_config("train", [f"dataset={name}", *overrides])


# --- annotations -------------------------------------------------------------------------------


def test_ssv2_class_is_the_template_without_brackets(tmp_path):
    root = make_ssv2(tmp_path / "ssv2")
    cfg = compose_dataset("ssv2", f"dataset.root={root}", "backbone=tiny").dataset
    train = build_dataset(cfg, "train")
    assert train.class_names == list(SSV2_LABELS)  # index = id from labels.json
    assert [(r.id, r.label) for r in train.records] == [("11", 1), ("12", 2), ("13", 0)]
    assert train.records[0].path == str(root / "videos" / "11.webm")
    val = build_dataset(cfg, "val")
    assert [(r.id, r.label) for r in val.records] == [("21", 2)] and val.num_classes == 3


def test_ssv2_malformed_annotations_name_file_and_entry(tmp_path):
    root = make_ssv2(tmp_path / "ssv2")
    cfg = compose_dataset("ssv2", f"dataset.root={root}").dataset
    path = root / "annotations" / "something-something-v2-validation.json"
    entries = [{"id": "1", "template": "Holding [something]"}, {"id": "2", "template": "Juggling [it]"}]
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=r"validation.json: entry 1 \(id 2\): template 'Juggling it'"):
        build_dataset(cfg, "val")
    path.write_text('[{"id": "1",\n "template": }]')
    with pytest.raises(ValueError, match="validation.json: invalid JSON at line 2"):
        build_dataset(cfg, "val")
    with pytest.raises(ValueError, match="dataset.test_file is not set"):
        build_dataset(cfg, "test")


def test_k400_csv_layouts_and_class_map(tmp_path):
    root = make_k400(tmp_path / "k400")
    cfg = compose_dataset("k400", f"dataset.root={root}").dataset
    train = build_dataset(cfg, "train")
    assert train.class_names == K400_CLASSES  # sorted labels of the train csv
    labels = {r.id: r.label for r in train.records}
    assert labels == {"bbb_000000_000010": 2, "aaa_000014_000024": 1, "ccc_000005_000015": 0}
    assert not train.missing
    val = build_dataset(cfg, "val")  # per-class folders, detected; the train csv's class map
    assert val.class_names == K400_CLASSES and not val.missing
    assert {r.id: r.label for r in val.records} == {"ddd_000001_000011": 0, "eee_000002_000012": 2}
    assert val.records[1].path.endswith(os.path.join("val", "riding_a_bike,_fast", "eee_000002_000012.mp4"))

    label_map = tmp_path / "classes.txt"
    label_map.write_text("riding a bike, fast\nabseiling\npassing American football (in game)\n")
    val = build_dataset(OmegaConf.merge(cfg, {"label_map": str(label_map)}), "val")
    assert [r.label for r in val.records] == [1, 0]


def test_k400_malformed_csv_names_file_and_line(tmp_path):
    root = make_k400(tmp_path / "k400")
    cfg = compose_dataset("k400", f"dataset.root={root}").dataset
    val_csv = root / "annotations" / "val.csv"
    val_csv.write_text(K400_VAL + "abseiling,fff,1,11\n")
    with pytest.raises(ValueError, match=r"val.csv:4: expected 5 columns"):
        build_dataset(cfg, "val")
    val_csv.write_text(K400_VAL + "juggling balls,fff,1,11,val\n")
    with pytest.raises(ValueError, match=r"val.csv:4: label 'juggling balls' is not one of the 3 classes"):
        build_dataset(cfg, "val")
    val_csv.write_text(K400_VAL + "abseiling,fff,one,11,val\n")
    with pytest.raises(ValueError, match=r"val.csv:4: time_start/time_end must be numbers"):
        build_dataset(cfg, "val")


def test_list_format(tmp_path):
    root = make_list(tmp_path / "data", [("a/x 1.mp4", 0), ("b.webm", 2)])
    label_map = tmp_path / "names.txt"
    label_map.write_text("cat\ndog\nbird\n")
    named = {"train_file": str(root / "train.txt"), "video_dir": str(root), "label_map": str(label_map)}
    ds = build_dataset(cfg_for(**named), "train")
    assert [(r.path, r.label) for r in ds.records] == [(str(root / "a" / "x 1.mp4"), 0), (str(root / "b.webm"), 2)]
    assert ds.class_names == ["cat", "dog", "bird"]
    ds = build_dataset(cfg_for(train_file=str(root / "train.txt"), video_dir=str(root)), "train")
    assert ds.class_names == ["0", "1", "2"]  # 0..max label without a label map
    (root / "train.txt").write_text("a/x 1.mp4 0\nb.webm two\n")
    with pytest.raises(ValueError, match=r"train.txt:2: .*the last field is not an integer class id"):
        build_dataset(cfg_for(train_file=str(root / "train.txt"), video_dir=str(root)), "train")
    (root / "train.txt").write_text("a/x 1.mp4 3\n")
    with pytest.raises(ValueError, match=r"train.txt:1: label 3 but there are 3 classes"):
        build_dataset(cfg_for(**named), "train")


def test_missing_videos_are_reported_and_left_out(tmp_path):
    entries = [(f"v{i}.mp4", 0) for i in range(4)] + [("missing_1.mp4", 1), ("sub/missing_2.mp4", 0)]
    root = make_list(tmp_path / "data", entries)
    cfg = cfg_for(train_file=str(root / "train.txt"), video_dir=str(root), num_classes=2)
    report = tmp_path / "report"
    ds = build_dataset(cfg, "train", report_dir=report)
    assert len(ds) == 4 and [r.id for r in ds.records] == ["v0.mp4", "v1.mp4", "v2.mp4", "v3.mp4"]
    expected = [str(root / "missing_1.mp4"), str(root / "sub" / "missing_2.mp4")]
    assert ds.missing == expected
    assert (report / "missing_train.txt").read_text().splitlines() == expected
    with pytest.raises(ValueError, match=r"2 of 6 videos are missing.*dataset.max_missing_fraction=0.2"):
        build_dataset(OmegaConf.merge(cfg, {"max_missing_fraction": 0.2}), "train")

    # Once the videos are back (a resumed run), the list goes; a split with none missing writes none.
    for path in (root / "missing_1.mp4", root / "sub" / "missing_2.mp4"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes((root / "v0.mp4").read_bytes())
    assert len(build_dataset(cfg, "train", report_dir=report)) == 6
    assert not (report / "missing_train.txt").exists()
    with pytest.raises(ValueError, match="6 of 6 videos are missing"):
        elsewhere = {"video_dir": str(tmp_path / "elsewhere"), "max_missing_fraction": 1.0}
        build_dataset(OmegaConf.merge(cfg, elsewhere), "train")


def test_unknown_name_decoder_sampling(tmp_path):
    root = make_list(tmp_path / "data", [("v0.mp4", 0)])
    base = {"train_file": str(root / "train.txt"), "video_dir": str(root)}
    for key, value in (("name", "ucf"), ("decoder", "opencv"), ("sampling", "uniform"), ("short_video", "wrap")):
        with pytest.raises(ValueError, match=f"dataset.{key}='{value}'"):
            build_dataset(cfg_for(**base, **{key: value}), "train")


# --- items -------------------------------------------------------------------------------------


def test_train_and_eval_items(tmp_path):
    root = make_list(tmp_path / "data", [("a.mp4", 0), ("b.webm", 1), ("c.mp4", 1)])
    cfg = cfg_for(train_file=str(root / "train.txt"), val_file=str(root / "train.txt"), video_dir=str(root))
    item = build_dataset(cfg, "train")[1]
    assert item["video"].shape == (T, 3, CROP, CROP) and item["video"].dtype == torch.uint8
    assert item["mask"].dtype == torch.bool and item["mask"].all()
    assert (item["label"], item["index"], item["num_replaced"]) == (1, 1, 0)

    repeated = build_dataset(OmegaConf.merge(cfg, {"repeated_aug": 3, "scale": [0.1, 0.3]}), "train")[0]
    assert repeated["video"].shape == (3, T, 3, CROP, CROP) and repeated["mask"].shape == (3, T)
    assert not torch.equal(repeated["video"][0], repeated["video"][1])  # augmented independently

    clip_val = build_dataset(cfg, "val")
    item = clip_val[2]
    assert item["video"].shape == (1, T, 3, CROP, CROP) and item["mask"].shape == (1, T)
    assert item["failed"] is False and item["label"] == 1
    multi = build_dataset(cfg, "val", views=True)
    first, second = multi[0], multi[0]
    assert first["video"].shape == (6, T, 3, CROP, CROP) and first["mask"].all()
    assert torch.equal(first["video"], second["video"])  # deterministic
    # views are clip-major: views 0-2 are clip 0's left/centre/right crops (red ramp rises)
    red = first["video"][:3, :, 0].float().mean(dim=(1, 2, 3))
    assert red[0] < red[1] < red[2]


def test_short_video_is_padded_with_a_mask(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    write_video(root / "short.mp4", num_frames=3, width=40, height=32)
    (root / "train.txt").write_text("short.mp4 0\n")
    item = build_dataset(cfg_for(train_file=str(root / "train.txt"), video_dir=str(root), num_frames=5), "train")[0]
    assert item["mask"].tolist() == [True, True, True, False, False]
    assert torch.equal(item["video"][3], item["video"][2])  # padding repeats the last real frame


@pytest.fixture
def broken_list(tmp_path, bad_videos):
    """good0, zero-byte, text, truncated mp4, truncated faststart mp4, good1 (labels 0..5)."""
    root = tmp_path / "data"
    root.mkdir()
    write_video(root / "good0.mp4", num_frames=12, width=40, height=32)
    write_video(root / "good1.webm", num_frames=12, width=40, height=32)
    bad = [str(bad_videos[k]) for k in ("zero", "text", "truncated", "truncated_faststart")]
    names = ["good0.mp4", *bad, "good1.webm"]
    (root / "list.txt").write_text("".join(f"{n} {i}\n" for i, n in enumerate(names)))
    return cfg_for(train_file=str(root / "list.txt"), val_file=str(root / "list.txt"), video_dir=str(root))


def test_unreadable_videos_are_replaced_in_train_and_failed_in_eval(broken_list, caplog):
    train = build_dataset(broken_list, "train")
    item = train[1]  # zero-byte -> text -> truncated -> truncated faststart -> good1
    assert (item["index"], item["label"], item["num_replaced"]) == (5, 5, 4)
    assert "zero.mp4" in caplog.text and "replaced by the next one" in caplog.text
    assert train[0]["num_replaced"] == 0

    val = build_dataset(broken_list, "val", views=True)
    for index in range(1, 5):
        item = val[index]
        assert item["failed"] is True and item["index"] == index and item["label"] == index
        assert item["video"].shape == (6, T, 3, CROP, CROP) and not item["video"].any() and not item["mask"].any()
    assert val[5]["failed"] is False and val[5]["video"].any()

    strict = build_dataset(OmegaConf.merge(broken_list, {"max_replacements": 2}), "train")
    with pytest.raises(RuntimeError, match=r"3 videos in a row from index 1 could not be decoded"):
        strict[1]


def test_hung_video_counts_as_failed_and_the_job_goes_on(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    os.mkfifo(root / "hangs.mp4")  # opening blocks forever inside the decoder
    write_video(root / "good.mp4", num_frames=12, width=40, height=32)
    (root / "list.txt").write_text("hangs.mp4 0\ngood.mp4 1\n")
    cfg = cfg_for(
        train_file=str(root / "list.txt"),
        val_file=str(root / "list.txt"),
        video_dir=str(root),
        decode_timeout=1.0,
        fallback_decoder=None,
    )
    start = time.monotonic()
    item = build_dataset(cfg, "train")[0]
    assert (item["index"], item["num_replaced"]) == (1, 1)
    assert build_dataset(cfg, "val")[0]["failed"] is True
    assert time.monotonic() - start < 15


def test_dataloader_with_two_workers(broken_list):
    train = build_dataset(broken_list, "train")
    batches = list(DataLoader(train, batch_size=2, num_workers=2))
    assert sum(len(b["index"]) for b in batches) == 6
    assert batches[0]["video"].shape == (2, T, 3, CROP, CROP) and batches[0]["mask"].dtype == torch.bool
    # items 1-4 are broken: each is replaced by the next good video (good1, index 5)
    assert torch.cat([b["num_replaced"] for b in batches]).tolist() == [0, 4, 3, 2, 1, 0]

    val = build_dataset(broken_list, "val")
    batches = list(DataLoader(val, batch_size=4, num_workers=2))
    failed = torch.cat([b["failed"] for b in batches])
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(6))  # each video once
    assert failed.tolist() == [False, True, True, True, True, False]


# --- configs -------------------------------------------------------------------------------------

COMMON_KEYS = {
    "name",
    "root",
    "num_frames",
    "sampling",
    "stride",
    "decoder",
    "decode_timeout",
    "crop_size",
    "test_clips",
    "test_crops",
    "hflip",
    "scale",
    "ratio",
    "randaug_n",
    "randaug_m",
    "random_erasing",
    "repeated_aug",
    "short_video",
    "fallback_decoder",
    "max_missing_fraction",
    "max_replacements",
}


@pytest.mark.parametrize(
    "name,backbone,hflip,sampling",
    [
        ("ssv2", "vit_base_patch16_224", False, "segment"),
        ("k400", "vit_base_patch16_224", True, "dense"),
        ("list", "vit_base_patch16_224", True, "dense"),
        ("synthetic", "vit_tiny_patch16_224", False, "segment"),
    ],
)
def test_dataset_configs_compose(name, backbone, hflip, sampling):
    cfg = compose_dataset(name)
    assert COMMON_KEYS <= set(cfg.dataset.keys())
    assert cfg.dataset.name == name and cfg.backbone.name.startswith(backbone)
    assert cfg.dataset.crop_size == cfg.backbone.img_size
    assert cfg.dataset.hflip is hflip and cfg.dataset.sampling == sampling
    assert cfg.dataset.decoder == "decord"


@pytest.mark.parametrize("name", ["ssv2", "k400", "list", "synthetic", "tokens"])
def test_each_format_is_found_by_the_name_its_config_gives(name):
    dataset_format = find_format(compose_dataset(name).dataset.name)
    assert dataset_format is FORMATS[name] and dataset_format.name == name
    assert dataset_format.decodes_videos is (name != "tokens")  # the token cache is the format of no videos
    with pytest.raises(
        ValueError, match=r"dataset.name='ucf101': choose one of \['ssv2', 'k400', 'list', 'synthetic', 'tokens'\]"
    ):
        find_format("ucf101")


def test_no_code_outside_the_token_cache_format_compares_a_dataset_name_with_tokens():
    # What the rest of the code needs to know of a token cache it asks its format (`decodes_videos`,
    # `run_settings`, `open_split`): a new format that is not videos then needs no change elsewhere.
    repo = Path(__file__).resolve().parents[1]
    allowed = {repo / "squarefuse" / "datasets" / "formats.py", repo / "squarefuse" / "datasets" / "token_cache.py"}
    compared = re.compile(r"""[!=]=\s*["']tokens["']|["']tokens["']\s*[!=]=|\bin\s*[(\[{][^)\]}]*["']tokens["']""")
    files = [*(repo / "squarefuse").rglob("*.py"), *(repo / "scripts").rglob("*.py"), *repo.glob("*.py")]
    found = [
        f"{path.relative_to(repo)}:{number}: {line.strip()}"
        for path in files
        if path not in allowed
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if compared.search(line)
    ]
    assert len(files) > 100 and found == []


def test_keys_come_from_the_config_not_from_code_defaults(tmp_path):
    root = make_list(tmp_path / "data", [("v0.mp4", 0)])
    cfg = OmegaConf.to_container(cfg_for(train_file=str(root / "train.txt"), video_dir=str(root)))
    assert len(build_dataset(cfg, "train")) == 1
    for key in ("label_map", "max_replacements", "augment_on_device", "short_video"):
        with pytest.raises(ValueError, match=f"dataset.{key} is missing from the config"):
            build_dataset({k: v for k, v in cfg.items() if k != key}, "train")


def test_the_dataset_selects_a_recipe_that_recipe_swaps():
    ssv2, synthetic = compose_dataset("ssv2"), compose_dataset("synthetic")
    assert ssv2.backbone.name.startswith("vit_base_patch16_224") and ssv2.optim.lr == 5e-4 and ssv2.trainer.mixup == 0.8
    assert synthetic.backbone.name == "vit_tiny_patch16_224" and synthetic.optim.lr == 2e-3
    assert synthetic.trainer.epochs == 20 and synthetic.trainer.mixup == 0.0

    swapped = compose_dataset("ssv2", "recipe=tiny_scratch")
    for group in ("backbone", "optim", "trainer"):
        assert swapped[group] == synthetic[group]
    assert swapped.dataset == OmegaConf.merge(ssv2.dataset, {"crop_size": 64})  # the crop follows the backbone
    back = compose_dataset("synthetic", "recipe=vitb16_finetune")
    assert all(back[group] == ssv2[group] for group in ("backbone", "optim", "trainer"))
    # the command line still wins over the recipe
    assert compose_dataset("ssv2", "recipe=tiny_scratch", "optim.lr=0.01", "backbone=vit_s16").optim.lr == 0.01


def test_ssv2_never_flips_by_default(tmp_path):
    """A flip would turn "left to right" into "right to left": the ssv2 config must not flip."""
    root = make_ssv2(tmp_path / "ssv2")
    cfg = compose_dataset(
        "ssv2",
        f"dataset.root={root}",
        "backbone=tiny",
        "dataset.randaug_n=0",
        "dataset.random_erasing=0",
        "dataset.repeated_aug=1",
    ).dataset
    train = build_dataset(cfg, "train")

    def flipped(video):  # the test videos' red channel rises from left to right
        red = video[:, 0].float()
        return bool(red[..., :8].mean() > red[..., -8:].mean())

    assert not any(flipped(train[i % 3]["video"]) for i in range(24))
    flipping = build_dataset(OmegaConf.merge(cfg, {"hflip": True}), "train")
    assert any(flipped(flipping[i % 3]["video"]) for i in range(24))  # the check can see a flip


def test_synthetic_dataset_is_generated_and_read(tmp_path):
    cfg = compose_dataset(
        "synthetic",
        f"dataset.root={tmp_path / 'synthetic'}",
        "dataset.generate.train_per_class=1",
        "dataset.generate.val_per_class=1",
        "dataset.generate.test_per_class=1",
        "dataset.generate.size=32",
    ).dataset
    train = build_dataset(cfg, "train")
    val = build_dataset(cfg, "val", views=True)
    assert train.num_classes == 8 and len(train) == 8 and len(val) == 8
    assert sorted(r.label for r in train.records) == list(range(8))
    item = val[0]
    assert item["video"].shape == (6, 8, 3, 64, 64) and item["failed"] is False


def test_fallback_decoder_reads_what_decord_cannot(tmp_path, caplog):
    # decord 0.6.0 fails on frames 16, 24, 48 or 72 px wide ("Check failed: from_size == to_size").
    root = tmp_path / "data"
    write_video(root / "w48.webm", num_frames=12, width=48, height=32)
    write_video(root / "w40.webm", num_frames=12, width=40, height=32)
    (root / "list.txt").write_text("w48.webm 0\nw40.webm 1\n")
    cfg = cfg_for(train_file=str(root / "list.txt"), val_file=str(root / "list.txt"), video_dir=str(root))
    val = build_dataset(cfg, "val")
    assert val[0]["failed"] is False and val[0]["video"].any()
    assert "decoded" in caplog.text and "w48.webm with pyav after decord" in caplog.text
    no_fallback = build_dataset(OmegaConf.merge(cfg, {"fallback_decoder": None}), "val")
    assert no_fallback[0]["failed"] is True and no_fallback[1]["failed"] is False


def test_decode_short_side_values():
    from squarefuse.datasets.build import _decode_short_side  # noqa: PLC0415 - one private helper

    assert _decode_short_side("auto", eval_short_side=256) == 256
    assert _decode_short_side(320, eval_short_side=256) == 320
    assert _decode_short_side(None, eval_short_side=256) is None
    for bad in ("big", -5):
        with pytest.raises(ValueError, match="dataset.decode_short_side"):
            _decode_short_side(bad, eval_short_side=256)


def test_decode_device_cuda_is_checked_for_train_only(tmp_path, monkeypatch):
    from squarefuse.datasets.decoding import gpu  # noqa: PLC0415 - the module whose CUDA check is faked

    video = write_video(tmp_path / "a.mp4", num_frames=8)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{video} 0\n")
    cfg = cfg_for(train_file=str(listing), val_file=str(listing), video_dir=None, decode_device="cuda")
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="dataset.decode_device=cuda"):
        build_dataset(cfg, "train")
    assert build_dataset(cfg, "val").decode_device == "cpu"  # eval decodes on the CPU anywhere
