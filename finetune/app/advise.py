"""Which cell of the transfer-learning table is this data in? Two measured numbers decide.

    advice = advise(scan("mydata"), backbone="lite0")
    advice.strategy        # "linear-probe" | "stage-probe" | "partial-finetune" | "full-finetune"
    advice.reason          # one sentence with both numbers and their thresholds
    advice.command         # the `finetune run` line to use

How much data: the median number of images per class (threshold 200: below it, training a
CNN's weights mostly overfits; CS231n's "very little data" cell).

How far from ImageNet: **ImageNet familiarity** = 1 - (mean entropy of the backbone's own
1000-way ImageNet prediction on a sample of the images) / log(1000). A network that recognizes
what it sees answers with confidence (photos of cats, coffee, rockets: familiarity 0.5-0.9);
on handwritten digits, textures or micrographs its ImageNet answer is diffuse (0.15-0.3).
It needs no labels and one forward over at most `sample` images. Measured with lite0 on
crops: coffee 0.90, chelsea 0.78, cat 0.78, rocket 0.53, retina 0.58, sklearn's sample photos
0.42, astronaut 0.35, hubble 0.32, immunohistochemistry 0.28, grass 0.19, gravel 0.16,
digits 0.16-0.24. Threshold: 0.35 (below: "different from ImageNet").
"""

from __future__ import annotations

import logging
import shlex
import statistics
from dataclasses import asdict, dataclass

import numpy as np

from finetune.console import text_table
from finetune.data.index import DatasetIndex
from finetune.errors import BackboneError, DataError

log = logging.getLogger(__name__)

DATA_THRESHOLD = 200  # median images per class
FAMILIARITY_THRESHOLD = 0.35

# (little data, near ImageNet) -> strategy: the 2x2 table of the lectures.
CELLS: dict[tuple[bool, bool], str] = {
    (True, True): "linear-probe",
    (True, False): "stage-probe",
    (False, True): "partial-finetune",
    (False, False): "full-finetune",
}


@dataclass(frozen=True)
class Advice:
    strategy: str
    reason: str
    command: str
    images_per_class: float  # median over classes
    familiarity: float  # 1 - normalized ImageNet prediction entropy, in [0, 1]
    data_threshold: int
    familiarity_threshold: float
    sampled: int  # images the familiarity was measured on

    @property
    def little_data(self) -> bool:
        return self.images_per_class < self.data_threshold

    @property
    def near_imagenet(self) -> bool:
        return self.familiarity >= self.familiarity_threshold

    def to_dict(self) -> dict:
        return {**asdict(self), "little_data": self.little_data, "near_imagenet": self.near_imagenet}


def sample_positions(index: DatasetIndex, n: int, seed: int = 0) -> list[int]:
    """Up to n positions, the same share of every class, seeded."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(index.labels)
    share = min(1.0, n / max(1, len(labels)))
    out: list[int] = []
    for k in range(len(index.classes)):
        members = np.flatnonzero(labels == k)
        take = max(1, int(round(share * len(members)))) if len(members) else 0
        out += rng.permutation(members)[:take].tolist()
    return sorted(out)


def imagenet_familiarity(
    backbone,
    index: DatasetIndex,
    positions: list[int],
    device: str = "cpu",
    workers: int = 0,
    batch_size: int = 32,
    cache: bool = True,
) -> tuple[float, int]:
    """(1 - mean normalized entropy of the ImageNet softmax, images that decoded).

    Each image's entropy is cached like a feature (keyed by the network and the file), so a
    second `advise` or `run --strategy auto` on the same images neither builds the network nor
    imports torch.
    """
    from finetune.features.cache import FeatureIdentity
    from finetune.features.extract import extract_lazy

    def network():
        from finetune.models.anatomy import ImageNetEntropy

        return ImageNetEntropy(backbone.model)

    ident = (
        FeatureIdentity.of(backbone, "imagenet-entropy", "none", backbone.preprocessing) if cache else None
    )
    feats = extract_lazy(
        network,
        index,
        positions,
        backbone.preprocessing,
        batch_size=batch_size,
        workers=workers,
        device=device,
        description="ImageNet familiarity",
        identity=ident,
        cache=cache,
    )
    if len(feats.x) == 0:
        raise DataError("no sampled image could be read", "run `finetune check DATA` to see why")
    return 1.0 - float(np.mean(feats.x[:, 0], dtype=np.float64)), len(feats.x)


def advise(
    index: DatasetIndex,
    backbone: str = "lite0",
    device: str = "auto",
    workers: int | None = None,
    sample: int = 256,
    seed: int = 0,
    data_threshold: int = DATA_THRESHOLD,
    familiarity_threshold: float = FAMILIARITY_THRESHOLD,
    cache: bool = True,
    weights_file: str | None = None,
    weights_map: str = "name",
    offline: bool = False,
) -> Advice:
    """Measure the data and pick the cell. The backbone must carry ImageNet weights.

    `cache`: read and write the per-image familiarity in the feature cache (and the backbone card).
    `weights_file`, `weights_map`: as `run --weights`, so auto measures the network it will train.
    `offline`: published weights from the caches only, never downloaded.
    """
    from finetune.data.loader import default_workers
    from finetune.io import cache_writable
    from finetune.models.backbone import open_backbone
    from finetune.runtime import check_device

    device = check_device(device)
    cache = cache and cache_writable()
    bb = open_backbone(
        backbone, weights_file=weights_file, weights_map=weights_map, cards=cache, offline=offline
    )
    if bb.weights.source == "random":
        raise BackboneError(
            f"{backbone} has no ImageNet weights here, so nothing transfers to measure",
            "advise with a pretrained backbone (e.g. --backbone lite0)",
        )
    counts = [n for n in index.counts().values()]
    per_class = float(statistics.median(counts)) if counts else 0.0
    positions = sample_positions(index, sample, seed)
    log.info(f"advise: measuring ImageNet familiarity on {len(positions)} images")
    fam, n = imagenet_familiarity(
        bb,
        index,
        positions,
        device=device,
        workers=default_workers() if workers is None else workers,
        cache=cache,
    )
    little, near = per_class < data_threshold, fam >= familiarity_threshold
    strategy = CELLS[(little, near)]
    reason = (
        f"{'little' if little else 'a lot of'} data ({per_class:g} images per class, "
        f"{'<' if little else '>='} {data_threshold}) and "
        f"{'similar to' if near else 'different from'} ImageNet "
        f"(familiarity {fam:.2f} {'>=' if near else '<'} {familiarity_threshold})"
    )
    # A command to paste into a shell: every part quoted as the shell needs (spaces, $, ;, quotes).
    command = shlex.join(["finetune", "run", str(index.root), "--backbone", backbone, "--strategy", strategy])
    return Advice(strategy, reason, command, per_class, fam, data_threshold, familiarity_threshold, n)


# A measurement this close to its threshold makes a close call: the cell next to it may do as well.
CLOSE_FAMILIARITY = 0.05  # absolute; photos and textures lie 0.15-0.9 apart, one folder's sample varies ~0.02
CLOSE_DATA = 0.25  # relative: 150-250 images per class around 200


def format_advice(a: Advice) -> str:
    """The two measurements beside their thresholds, the 2x2 table with the chosen cell, the command.

    When a measurement lies close to its threshold the text says so and names the other cell to try.
    """
    data_gap = a.images_per_class - a.data_threshold
    fam_gap = a.familiarity - a.familiarity_threshold
    close_data = abs(data_gap) <= CLOSE_DATA * a.data_threshold
    close_fam = abs(fam_gap) <= CLOSE_FAMILIARITY
    rows = [
        [
            "images per class (median)",
            f"{a.images_per_class:g}",
            f"{a.data_threshold}",
            f"{data_gap:+g}",
            ("close: " if close_data else "") + ("little data" if a.little_data else "a lot of data"),
        ],
        [
            f"ImageNet familiarity ({a.sampled} images)",
            f"{a.familiarity:.3f}",
            f"{a.familiarity_threshold:g}",
            f"{fam_gap:+.3f}",
            ("close: " if close_fam else "")
            + ("similar to ImageNet" if a.near_imagenet else "different from ImageNet"),
        ],
    ]
    mark = {s: ("[x]" if s == a.strategy else "[ ]") + " " + s for s in CELLS.values()}
    cells = [
        ["little data", mark["linear-probe"], mark["stage-probe"]],
        ["a lot of data", mark["partial-finetune"], mark["full-finetune"]],
    ]
    lines = [
        text_table(["measurement", "value", "threshold", "margin", "reads as"], rows, right=(1, 2, 3)),
        "",
        text_table(["", "similar to ImageNet", "different from ImageNet"], cells),
        "",
        f"advice: {a.strategy} — {a.reason}",
    ]
    near, others = [], []
    if close_data:
        near.append(f"{a.images_per_class:g} images per class is {abs(data_gap):g} from {a.data_threshold}")
        others.append(CELLS[(not a.little_data, a.near_imagenet)])
    if close_fam:
        near.append(f"familiarity {a.familiarity:.3f} is {abs(fam_gap):.3f} from {a.familiarity_threshold:g}")
        others.append(CELLS[(a.little_data, not a.near_imagenet)])
    if near:
        tries = " ".join(f"-s {s}" for s in (a.strategy, *others))
        lines.append(
            f"close call: {' and '.join(near)}, so {' or '.join(others)} may do as well "
            f"(`finetune compare DATA {tries}` measures them side by side)"
        )
    lines.append(f"run:    {a.command}")
    return "\n".join(lines)
