"""Is the CPU augmentation cheap next to decoding? Throughput of one loader worker, side by side.

    python scripts/benchmark_loader.py            # K400-like and SSv2-like videos, real recipes
    python scripts/benchmark_loader.py --json     # machine-readable
    python scripts/benchmark_loader.py --quick    # tiny videos and crops (seconds; for tests)

It writes two test videos like the real ones (K400: H.264, 340x256, 30 fps, 10 s; SSv2: VP9,
427x240, 12 fps, 4 s) and takes the recipes of configs/dataset/{k400,ssv2}.yaml (sampling,
frames, stride, decoder, decode guard, crop 224, RandomResizedCrop, flip, RandAugment, random
erasing, repeated augmentation), then measures, in this one process as a DataLoader worker runs
it (torch on 1 thread):

    raw decode   open the video + sample the train frame indices + decode them
    pipeline     dataset[i]: the same + every train transform (what a worker returns)

The two loops are interleaved round by round (alternating which goes first, the same frame
indices in both) and medians over rounds are reported, so machine noise hits both alike.
``ratio`` = pipeline / raw decode in decoded clips per second (median of the per-round ratios):
the share of a worker's decoding speed left after augmentation (the target is >= 0.85).
With repeated augmentation R > 1 a pipeline item holds R augmented clips.
The per-transform cost (``--profile``, and always when a ratio is below the target) times each
step of the train transform separately on decoded frames, to show where the time goes.

``--decoders`` compares the decoders instead (decord, PyAV, torchcodec where it loads), raw decode
of the same train clips side by side in the guarded decoding process, as ratios to decord; and on a
720p H.264 clip (raw K400 is often that large) decode-time resize to the recipe's short side
(``dataset.decode_short_side``) against decoding full frames and resizing them afterwards.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from squarefuse.datasets.synthetic.encoding import write_video

REPO = Path(__file__).resolve().parent.parent
TARGET_RATIO = 0.85
RESIZE_REFERENCE_HEIGHT = 480  # --decoders: taller videos are measured for decode-time resize


@dataclass(frozen=True)
class VideoSpec:
    """A synthetic stand-in for one dataset's videos."""

    name: str
    dataset: str  # the config in configs/dataset/ whose recipe is measured
    codec: str
    ext: str
    width: int
    height: int
    fps: int
    seconds: float


FULL = (
    VideoSpec("k400", "k400", "libx264", "mp4", 340, 256, 30, 10.0),
    VideoSpec("ssv2", "ssv2", "libvpx-vp9", "webm", 427, 240, 12, 4.0),
)
HD = VideoSpec("k400_720p", "k400", "libx264", "mp4", 1280, 720, 30, 4.0)
QUICK = (
    VideoSpec("k400", "k400", "libx264", "mp4", 160, 120, 30, 2.0),
    VideoSpec("ssv2", "ssv2", "libvpx-vp9", "webm", 142, 80, 12, 2.0),
)


def write_test_video(spec: VideoSpec, path: Path) -> Path:
    """A textured scene panning and a bright square moving: content an encoder must really code."""
    rng = np.random.default_rng(0)
    # A smooth random texture larger than the frame; each frame is a shifted window of it.
    coarse = rng.uniform(0, 255, size=(spec.height // 8 + 8, spec.width // 8 + 40, 3))
    texture = np.kron(coarse, np.ones((8, 8, 1)))
    num_frames = int(round(spec.fps * spec.seconds))
    options = {"crf": "23", "preset": "fast"}
    if spec.codec == "libvpx-vp9":
        options = {"crf": "32", "b": "0", "deadline": "realtime", "cpu-used": "8"}

    def frames():
        for t in range(num_frames):
            shift = int(t * 240 / max(1, num_frames))
            frame = texture[: spec.height, shift : shift + spec.width].copy()
            x = int((spec.width - spec.height // 3) * t / max(1, num_frames - 1))
            frame[spec.height // 3 : 2 * spec.height // 3, x : x + spec.height // 3] = (250, 240, 30)
            frame += rng.normal(0, 4, size=frame.shape)
            yield np.clip(frame, 0, 255).astype(np.uint8)

    return write_video(path, frames(), spec.fps, spec.codec, options=options)


def recipe(dataset: str, *, video: Path, quick: bool) -> dict:
    """The train recipe of configs/dataset/<dataset>.yaml, pointed at one video as a list dataset."""
    from hydra import compose, initialize_config_dir  # noqa: PLC0415
    from omegaconf import OmegaConf  # noqa: PLC0415

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"dataset={dataset}"])
    dataset_cfg = OmegaConf.to_container(cfg.dataset, resolve=True)
    list_file = video.with_suffix(".txt")
    list_file.write_text(f"{video.name} 0\n")
    folder = str(video.parent)
    dataset_cfg.update(
        name="list", train_file=str(list_file), video_dir=folder, train_video_dir=folder, num_classes=1, label_map=None
    )
    if quick:
        dataset_cfg.update(crop_size=64, num_frames=8)
    return dataset_cfg


def measure(dataset, *, rounds: int, iters: int) -> dict:
    """Interleaved rounds of raw decoding and full items; medians of clips/s per loop.

    Both loops of a round decode the same frame indices: the cost of a dense clip depends a lot
    on where it starts (decoding runs from the keyframe before it), so different draws would
    add noise of their own. Torch's generator is reseeded per round and the raw loop derives its
    numpy generator the way `VideoDataset` does for a train item.
    """
    import torch  # noqa: PLC0415

    from squarefuse.datasets.decoding.video_reader import open_video  # noqa: PLC0415

    path = dataset.records[0].path

    def raw_decode() -> None:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        with open_video(path, dataset.decoder, timeout=dataset.decode_timeout) as video:
            index_CT, _ = dataset.frame_sampler(video.num_frames, rng)
            video.get_frames(index_CT.reshape(-1))

    def pipeline() -> None:
        dataset[0]

    loops = {"raw_decode": raw_decode, "pipeline": pipeline}
    rates: dict[str, list[float]] = {name: [] for name in loops}
    raw_decode(), pipeline()  # warm up: decoding process started, caches filled
    for r in range(rounds):
        order = list(loops) if r % 2 == 0 else list(loops)[::-1]
        for name in order:
            torch.manual_seed(r)
            start = time.perf_counter()
            for _ in range(iters):
                loops[name]()
            rates[name].append(iters / (time.perf_counter() - start))
    raw, full = statistics.median(rates["raw_decode"]), statistics.median(rates["pipeline"])
    # Paired: the two loops of a round ran back to back, so their ratio cancels slow drifts.
    ratio = statistics.median(p / r for p, r in zip(rates["pipeline"], rates["raw_decode"], strict=True))
    return {
        "raw_decode_clips_s": round(raw, 2),
        "pipeline_clips_s": round(full, 2),
        "pipeline_augmented_clips_s": round(full * dataset.repeated_aug, 2),
        "ratio": round(ratio, 3),
        "rounds_raw": [round(x, 2) for x in rates["raw_decode"]],
        "rounds_pipeline": [round(x, 2) for x in rates["pipeline"]],
    }


def profile_transforms(dataset, *, iters: int) -> dict:
    """Milliseconds per decoded clip of each train step, timed alone on real decoded frames."""
    import torch  # noqa: PLC0415
    from torchvision import tv_tensors  # noqa: PLC0415

    from squarefuse.datasets.decoding.video_reader import open_video  # noqa: PLC0415

    rng = np.random.default_rng(0)
    path = dataset.records[0].path
    timings: dict[str, list[float]] = {}

    def timed(name: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        timings.setdefault(name, []).append(1000 * (time.perf_counter() - start))
        return out

    steps = list(dataset.train_transform.transform.transforms)
    for _ in range(iters):
        with open_video(path, dataset.decoder, timeout=dataset.decode_timeout) as video:
            index_CT, _ = timed("sample indices", dataset.frame_sampler, video.num_frames, rng)
            frames_THWC = timed("decode (open excluded)", video.get_frames, index_CT.reshape(-1))
        for _ in range(dataset.repeated_aug):  # each augmented copy pays every step
            x = tv_tensors.Video(frames_THWC.permute(0, 3, 1, 2))
            for i, step in enumerate(steps):
                x = timed(f"{i}: {type(step).__name__}", step, x)
            timed("contiguous copy", lambda v: v.as_subclass(torch.Tensor).contiguous(), x)
    per_clip = {name: statistics.median(values) * (len(values) // iters) for name, values in timings.items()}
    return {name: round(ms, 2) for name, ms in per_clip.items()}


def interleaved(loops: dict, *, rounds: int, iters: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median clips/s of each loop, and the median per-round ratio of each to the first loop.

    The loops run back to back in every round, in an order that rotates from round to round, and
    reseed torch alike so that all decode the same clips; paired ratios cancel slow drifts.
    """
    import torch  # noqa: PLC0415

    names = list(loops)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm up: decoding process started, caches filled
        loops[name]()
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            torch.manual_seed(r)
            start = time.perf_counter()
            for _ in range(iters):
                loops[name]()
            rates[name].append(iters / (time.perf_counter() - start))
    base = rates[names[0]]
    medians = {name: round(statistics.median(v), 2) for name, v in rates.items()}
    ratios = {
        name: round(statistics.median(a / b for a, b in zip(v, base, strict=True)), 3) for name, v in rates.items()
    }
    return medians, ratios


def compare_decoders(dataset, *, spec: VideoSpec, rounds: int, iters: int) -> dict:
    """Raw decode of the same train clips with each decoder (ratios to decord); on the 720p clip,
    decode-time resize vs full decode + resize for each decoder (ratios to decord full + resize)."""
    import torch  # noqa: PLC0415
    from torchvision.transforms.v2 import functional as F  # noqa: PLC0415

    from squarefuse.datasets.decoding.video_reader import open_video, torchcodec_problem  # noqa: PLC0415

    path = dataset.records[0].path
    decoders = ["decord", "pyav"] + ([] if torchcodec_problem() else ["torchcodec"])
    short_side = dataset.decode_short_side or 256

    def decode(decoder: str, *, at_decode: bool = False, resize_after: bool = False):
        def run() -> None:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
            size = short_side if at_decode else None
            with open_video(path, decoder, timeout=dataset.decode_timeout, short_side=size) as video:
                index_CT, _ = dataset.sampler(video.num_frames, rng)
                frames = video.get_frames(index_CT.reshape(-1))
            if resize_after:
                F.resize(frames.permute(0, 3, 1, 2), [short_side], antialias=True)

        return run

    if spec.height > RESIZE_REFERENCE_HEIGHT:
        loops = {}
        for decoder in decoders:
            loops[f"{decoder} full decode + resize"] = decode(decoder, resize_after=True)
            loops[f"{decoder} resize at decode"] = decode(decoder, at_decode=True)
        clip = f"frames to short side {short_side}"
    else:
        loops = {decoder: decode(decoder) for decoder in decoders}
        clip = "raw decode (no resize: the video is near the recipe's size)"
    rates, ratios = interleaved(loops, rounds=rounds, iters=iters)
    video = f"{spec.codec} {spec.width}x{spec.height} {spec.fps} fps {spec.seconds:g} s"
    clip = f"{dataset.sampler.num_frames} frames ({dataset.sampler.sampling}), {clip}"
    return {"video": video, "clip": clip, "clips_s": rates, "ratio": ratios}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="tiny videos, 64 px crops, few rounds (a smoke test)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7, quick 2)")
    parser.add_argument("--iters", type=int, default=None, help="clips per loop per round (default 8, quick 2)")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override dataset keys of both recipes, e.g. --set augment_on_device=false decoder=pyav",
    )
    parser.add_argument("--profile", action="store_true", help="always time each transform step")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the test videos go (default: a temp folder)")
    parser.add_argument("--json", action="store_true", help="print the results as json only")
    parser.add_argument("--decoders", action="store_true", help="compare the decoders and decode-time resize")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the results per video kind."""
    args = parse_args(argv)
    specs = QUICK if args.quick else FULL
    rounds = args.rounds or (2 if args.quick else 7)
    iters = args.iters or (2 if args.quick else 8)
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = args.work_dir or Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        # Encode before anything imports decord: once decord's bundled FFmpeg is loaded, PyAV's
        # VP9 encoder fails to open.
        if args.decoders:
            specs = (*specs, HD)
        videos = {s.name: write_test_video(s, work_dir / f"{s.name}.{s.ext}") for s in specs}

        import torch  # noqa: PLC0415

        from squarefuse.datasets import build_dataset  # noqa: PLC0415

        torch.set_num_threads(1)  # as in a DataLoader worker
        results = {}
        for spec in specs:
            cfg = recipe(spec.dataset, video=videos[spec.name], quick=args.quick)
            for item in args.set:
                key, _, value = item.partition("=")
                if key not in cfg:
                    raise ValueError(f"--set {item}: dataset.{key} is not a key of configs/dataset/{spec.dataset}.yaml")
                cfg[key] = yaml.safe_load(value)
            dataset = build_dataset(cfg, "train")
            if args.decoders:
                results[spec.name] = compare_decoders(dataset, spec=spec, rounds=rounds, iters=iters)
                continue
            result = {
                "video": f"{spec.codec} {spec.width}x{spec.height} {spec.fps} fps {spec.seconds:g} s",
                "recipe": f"{cfg['sampling']} {cfg['num_frames']} frames"
                + (f" stride {cfg['stride']}" if cfg["sampling"] == "dense" else "")
                + f", crop {cfg['crop_size']}, randaug n{cfg['randaug_n']} m{cfg['randaug_m']} + "
                f"erasing {cfg['random_erasing']} "
                f"{'on the device' if cfg.get('augment_on_device') else 'in the worker'}, "
                f"hflip {cfg['hflip']}, repeated_aug {dataset.repeated_aug}, "
                f"decoder {dataset.decoder}, decode_timeout {dataset.decode_timeout}",
                **measure(dataset, rounds=rounds, iters=iters),
            }
            if args.profile or result["ratio"] < TARGET_RATIO:
                result["ms_per_decoded_clip"] = profile_transforms(dataset, iters=max(iters, 3))
            results[spec.name] = result

    if args.json:
        print(json.dumps(results, indent=2))
    elif args.decoders:
        for name, r in results.items():
            print(f"{name}: {r['video']}, {r['clip']}")
            for loop, rate in r["clips_s"].items():
                print(f"  {loop:34s} {rate:8.2f} clips/s  ratio {r['ratio'][loop]:.3f}")
    else:
        for name, r in results.items():
            verdict = "ok" if r["ratio"] >= TARGET_RATIO else f"BELOW the {TARGET_RATIO:.0%} target"
            print(f"{name}: {r['video']}\n  recipe: {r['recipe']}")
            print(
                f"  raw decode {r['raw_decode_clips_s']:.2f} clips/s | pipeline {r['pipeline_clips_s']:.2f} "
                f"items/s ({r['pipeline_augmented_clips_s']:.2f} augmented clips/s) | ratio {r['ratio']:.3f} {verdict}"
            )
            for step, ms in r.get("ms_per_decoded_clip", {}).items():
                print(f"    {step:28s} {ms:8.2f} ms")
    return results


if __name__ == "__main__":
    main()
