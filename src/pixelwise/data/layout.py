"""Where a dataset's files are: the pixelwise layout, the PASCAL VOC layout, and safe paths.

The pixelwise layout (any split may be absent; a val-only set for evaluation is common)::

    DIR/images/{split}/NAME.{png,jpg,tif}
    DIR/masks/{split}/NAME.png                 semantic: index or palette PNG, 255 = ignore
    DIR/classes.json                           semantic: {"classes": [...], "ignore_index": 255}
    DIR/annotations/instances_{split}.json     COCO instances (file_name relative to images/{split})
    DIR/annotations/keypoints_{split}.json     COCO keypoints
    DIR/annotations/panoptic_{split}.json      COCO panoptic, with
    DIR/panoptic/{split}/NAME.png              segment id = R + 256 G + 256^2 B

The PASCAL VOC layout (DIR = .../VOC2012, or a VOCdevkit holding one VOC* folder)::

    DIR/JPEGImages/ID.jpg
    DIR/SegmentationClass/ID.png               palette PNG: 21 classes, 255 = boundary / ignore
    DIR/ImageSets/Segmentation/{train,val,...}.txt   one ID per line
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from pixelwise.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
ANNOTATION_KINDS = ("instances", "keypoints", "panoptic")
DEFAULT_IGNORE_INDEX = 255
_SPLIT_ORDER = ("train", "val", "test")

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
VOC_IGNORE_INDEX = 255  # the object boundaries and "difficult" regions in SegmentationClass


@dataclass(frozen=True)
class Problem:
    """Something wrong with a dataset file. ``str()`` is ``"PATH: message"``."""

    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"

    def to_error(self) -> BadFileError:
        """The same message as an exception, for loaders that refuse the sample."""
        return BadFileError(self.path, self.message)


class BadFileError(UserError):
    """A file that cannot be used. ``str()`` is ``"PATH: reason"``, as for `Problem`."""

    def __init__(self, path: str | Path, reason: str | None = None) -> None:
        if reason is None:
            # rebuilt from the message alone: unpickling, or torch re-raising a DataLoader
            # worker's exception as `type(message)`
            text = _worker_message(str(path), type(self))
            head, sep, tail = text.partition(": ")
            path, reason = (head, tail) if sep else ("", text)
            super().__init__(text)
        else:
            super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason

    @property
    def problem(self) -> Problem:
        return Problem(self.path, self.reason)


def _worker_message(text: str, kind: type) -> str:
    """The original one-line message inside torch's re-raised DataLoader worker error.

    torch re-raises a worker's exception as ``kind("Caught X in DataLoader worker process N."
    "\nOriginal Traceback ...\npackage.X: PATH: reason")``; the CLI shows the first line of an
    error, so keep the last one, the original message (the traceback goes to the debug log).
    """
    lines = text.strip().splitlines()
    prefix = f"{kind.__module__}.{kind.__qualname__}: "
    if len(lines) > 1 and lines[0].startswith("Caught ") and lines[-1].startswith(prefix):
        logger.debug("%s", text)
        return lines[-1][len(prefix):]
    return text


@dataclass(frozen=True)
class Classes:
    """Semantic class names (index = label value), the label value that means "ignore", and
    optionally one display colour (r, g, b) per class (overlays and figures use it)."""

    names: tuple[str, ...]
    ignore_index: int = DEFAULT_IGNORE_INDEX
    colors: tuple[tuple[int, int, int], ...] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.names)


VOC = Classes(VOC_CLASSES, VOC_IGNORE_INDEX)


@dataclass(frozen=True)
class SplitLayout:
    """The files of one split. Paths are set even when absent; `*_exists` says which exist.

    `image_ids` is the VOC list of image ids (ImageSets/Segmentation/{split}.txt), None for
    the pixelwise layout, whose images are the files of `images_dir`.
    """

    name: str
    images_dir: Path
    masks_dir: Path
    annotations: dict[str, Path] = field(default_factory=dict)  # kind -> existing json file
    panoptic_dir: Path | None = None
    image_ids: tuple[str, ...] | None = None
    list_file: Path | None = None  # VOC: the ImageSets file listing image_ids
    mask_suffix: str = ".png"
    image_suffix: str | None = None  # VOC: ".jpg"; pixelwise: any of IMAGE_SUFFIXES

    @property
    def has_images(self) -> bool:
        return self.images_dir.is_dir()

    @property
    def has_masks(self) -> bool:
        return self.masks_dir.is_dir()


@dataclass(frozen=True)
class DatasetLayout:
    """A dataset folder: its kind ("pixelwise" or "voc"), its splits and classes file."""

    root: Path
    kind: str
    splits: dict[str, SplitLayout]
    classes_json: Path | None = None

    def split(self, name: str) -> SplitLayout:
        """The layout of split `name`; a `UserError` naming the splits found otherwise."""
        if name not in self.splits:
            found = ", ".join(self.splits) or "none"
            raise UserError(f"{self.root}: no {name!r} split (found: {found})")
        return self.splits[name]

    def classes(self) -> Classes | None:
        """The semantic classes: VOC's 21, or classes.json when present, else None."""
        if self.kind == "voc":
            return VOC
        if self.classes_json is not None:
            return read_classes(self.classes_json)
        return None


def safe_join(root: str | Path, relative: str | os.PathLike) -> Path:
    """`root / relative`, refusing paths that leave `root`.

    Refused with a `UserError`: an empty path, an absolute path (POSIX or Windows style), a
    ``..`` component, a NUL byte, and a path that, after following symbolic links, resolves
    outside `root` (a link inside the dataset pointing elsewhere).
    """
    text = os.fspath(relative)
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"empty path {text!r} in dataset {root}")
    if "\0" in text:
        raise UserError(f"path {text!r} contains a NUL byte")
    posix, windows = PurePosixPath(text), PureWindowsPath(text)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or windows.root:
        raise UserError(f"absolute path {text!r} escapes the dataset root {root}")
    if ".." in posix.parts or ".." in windows.parts:
        raise UserError(f"path {text!r} escapes the dataset root {root} ('..')")
    root = Path(root)
    joined = root / posix
    real_root = root.resolve()
    if not joined.resolve().is_relative_to(real_root):
        raise UserError(f"path {text!r} escapes the dataset root {root} (a symbolic link "
                        "leads outside)")
    return joined


def read_classes(path: str | Path) -> Classes:
    """Read and validate a classes.json: ``{"classes": [names...], "ignore_index": 255}``, with
    an optional ``"colors": [[r, g, b], ...]`` (0-255, one per class) for display."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BadFileError(path, f"not valid JSON ({exc.msg} at line {exc.lineno} column "
                                 f"{exc.colno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadFileError(path, f"cannot read ({exc})") from None
    names = data.get("classes") if isinstance(data, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise BadFileError(path, 'expected {"classes": [names...]} with at least one name')
    if len(set(names)) != len(names):
        dups = sorted({n for n in names if names.count(n) > 1})
        raise BadFileError(path, f"duplicate class names {dups}")
    ignore = data.get("ignore_index", DEFAULT_IGNORE_INDEX)
    if isinstance(ignore, bool) or not isinstance(ignore, int):
        raise BadFileError(path, f"ignore_index must be an integer, got {ignore!r}")
    if 0 <= ignore < len(names):
        raise BadFileError(path, f"ignore_index {ignore} is also a class index "
                                 f"({names[ignore]!r}); use a value >= {len(names)}, such as 255")
    colors = data.get("colors")
    if colors is not None:
        if not (isinstance(colors, list) and len(colors) == len(names) and all(
                isinstance(c, list) and len(c) == 3 and all(
                    isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in c)
                for c in colors)):
            raise BadFileError(path, f"colors must be one [r, g, b] (integers 0-255) for each "
                                     f"of the {len(names)} classes")
        colors = tuple(tuple(c) for c in colors)
    return Classes(tuple(names), ignore, colors)


def detect_layout(root: str | Path) -> DatasetLayout:
    """Describe the dataset at `root` (pixelwise or VOC layout); `UserError` if neither."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: dataset folder not found" if not root.exists()
                        else f"{root}: not a folder")
    voc_root = _voc_root(root)
    if voc_root is not None:
        return _voc_layout(voc_root)
    layout = _pixelwise_layout(root)
    if not layout.splits and layout.classes_json is None:
        raise UserError(f"{root}: no dataset found (expected images/{{split}}/, masks/{{split}}/ "
                        "or annotations/*_{split}.json, or a PASCAL VOC folder with JPEGImages/)")
    return layout


def find_split(root: str | Path, split: str) -> SplitLayout:
    """The layout of one split of the dataset at `root`; `UserError` if it has no such split."""
    return detect_layout(root).split(split)


def link_problem(path: Path, folder: Path) -> Problem | None:
    """A Problem when `path` (a file found in `folder`) is a link resolving outside `folder`.

    The same boundary as `safe_join`: files are only read from inside their folder.
    """
    if path.resolve().is_relative_to(folder.resolve()):
        return None
    return Problem(path, f"symbolic link leads outside {folder}; refused")


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder` (by suffix, hidden files skipped), sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


def semantic_pairs(split: SplitLayout) -> tuple[list[tuple[Path, Path]], list[Problem]]:
    """(image, mask) paths of a split whose two files exist, and the problems of the listing.

    pixelwise layout: every image of images/{split}/ with masks/{split}/{stem}.png; problems:
    an image without its mask, two images with the same stem, a mask without an image.
    VOC: JPEGImages/{id}.jpg with SegmentationClass/{id}.png for each listed id; problems: an
    id that escapes the folder, a listed file that is missing.
    """
    pairs: list[tuple[Path, Path]] = []
    problems: list[Problem] = []
    if split.image_ids is not None:
        listed = split.list_file.name if split.list_file else "the split list"
        for line, image_id in enumerate(split.image_ids, start=1):
            try:
                image = safe_join(split.images_dir, f"{image_id}{split.image_suffix}")
                mask = safe_join(split.masks_dir, f"{image_id}{split.mask_suffix}")
            except UserError as exc:
                problems.append(Problem(split.list_file or split.images_dir,
                                        f"line {line}: {exc}"))
                continue
            missing = [p for p in (image, mask) if not p.is_file()]
            problems += [Problem(p, f"file not found (listed in {listed})") for p in missing]
            if not missing:
                pairs.append((image, mask))
        return pairs, problems
    images = list_images(split.images_dir)
    by_stem: dict[str, Path] = {}
    for image in images:
        if image.stem in by_stem:
            problems.append(Problem(image, f"two images named {image.stem!r} "
                                           f"({by_stem[image.stem].name} and {image.name}): "
                                           "which one the mask belongs to is ambiguous"))
            continue
        by_stem[image.stem] = image
        mask = split.masks_dir / f"{image.stem}{split.mask_suffix}"
        if not mask.is_file():
            problems.append(Problem(image, f"no mask (expected {mask})"))
            continue
        links = [link_problem(image, split.images_dir), link_problem(mask, split.masks_dir)]
        problems += [p for p in links if p]
        if not any(links):
            pairs.append((image, mask))
    if split.masks_dir.is_dir():
        for mask in sorted(split.masks_dir.iterdir()):
            if (mask.suffix.lower() == split.mask_suffix and not mask.name.startswith(".")
                    and mask.stem not in by_stem):
                problems.append(Problem(mask, f"mask without an image in {split.images_dir}"))
    return pairs, problems


# ----------------------------------------------------------------------------- discovery


def _pixelwise_layout(root: Path) -> DatasetLayout:
    names: set[str] = set()
    for sub in ("images", "masks", "panoptic"):
        if (root / sub).is_dir():
            names.update(p.name for p in (root / sub).iterdir()
                         if p.is_dir() and not p.name.startswith("."))
    annotations_dir = root / "annotations"
    found: dict[tuple[str, str], Path] = {}
    if annotations_dir.is_dir():
        for path in annotations_dir.glob("*.json"):
            kind, _, split = path.stem.partition("_")
            if kind in ANNOTATION_KINDS and split:
                found[(kind, split)] = path
                names.add(split)
    splits = {}
    for name in _ordered(names):
        splits[name] = SplitLayout(
            name=name,
            images_dir=root / "images" / name,
            masks_dir=root / "masks" / name,
            annotations={k: found[(k, name)] for k in ANNOTATION_KINDS if (k, name) in found},
            panoptic_dir=root / "panoptic" / name,
        )
    classes = root / "classes.json"
    return DatasetLayout(root, "pixelwise", splits, classes if classes.is_file() else None)


def _voc_root(root: Path) -> Path | None:
    if (root / "JPEGImages").is_dir():
        return root
    # a VOCdevkit folder holding exactly one VOC20xx folder
    inner = [p for p in root.glob("VOC*") if (p / "JPEGImages").is_dir()]
    return inner[0] if len(inner) == 1 else None


def _voc_layout(root: Path) -> DatasetLayout:
    lists = root / "ImageSets" / "Segmentation"
    splits = {}
    paths = {p.stem: p for p in lists.glob("*.txt")} if lists.is_dir() else {}
    for name in _ordered(paths):
        try:
            lines = paths[name].read_text(encoding="utf-8").split()
        except (OSError, UnicodeDecodeError) as exc:
            raise BadFileError(paths[name], f"cannot read ({exc})") from None
        splits[name] = SplitLayout(
            name=name,
            images_dir=root / "JPEGImages",
            masks_dir=root / "SegmentationClass",
            image_ids=tuple(lines),
            list_file=paths[name],
            image_suffix=".jpg",
        )
    return DatasetLayout(root, "voc", splits, None)


def _ordered(names) -> list[str]:
    """train, val, test first, then the other split names alphabetically."""
    names = set(names)
    return [n for n in _SPLIT_ORDER if n in names] + sorted(names - set(_SPLIT_ORDER))
