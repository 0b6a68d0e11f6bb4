"""The lecture's naive approach: classify the centre pixel of a P x P patch, one patch per pixel.

The network uses only stride-1 operations (3x3 convs whose dilations add up to exactly (P - 1) / 2
per side), ending in a fully-connected classifier on the 1 x 1 feature "map" that is left of a
patch. So the same weights run in two ways that give the same numbers:

* `sliding_window(images)`: literally cut the P x P patch around every pixel (zero- or
  reflect-padded image), batch the patches, classify each: the features of overlapping patches
  are computed again and again;
* `forward(images)`: pad the image once, run the convs over the whole of it, and apply the
  fully-connected layers as 1x1 convolutions ("convolutionalization", Long et al. 2015 Sec. 3.1):
  every intermediate value is computed once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pixelwise.errors import UserError, unknown_name
from pixelwise.models.base import SegmentationModel
from pixelwise.models.tiling import mirror_pad

PAD_MODES = ("zeros", "reflect")


def dilation_schedule(patch_size: int) -> list[int]:
    """Dilations of the 3x3 valid convs that shrink a P x P patch to 1 x 1: 1, 1, 2, 4, 8, ...
    (each conv takes 2 d pixels off), the last one chosen to land exactly on 1."""
    left = patch_size - 1
    schedule: list[int] = []
    nxt = 1
    while left > 0:
        d = nxt if 2 * nxt <= left else left // 2
        schedule.append(d)
        left -= 2 * d
        nxt = 1 if len(schedule) == 1 else nxt * 2
    return schedule


class PatchClassifier(SegmentationModel):
    """Sliding-window patch classifier: labels the centre pixel of each P x P patch (P odd).

    (N, C, H, W) -> (N, K, H, W) by `forward` (dense) or `sliding_window` (one patch per pixel).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        *,
        patch_size: int = 33,
        width: int = 32,
        hidden: int = 64,
        pad_mode: str = "zeros",
    ) -> None:
        super().__init__()
        if (
            isinstance(patch_size, bool)
            or not isinstance(patch_size, int)
            or patch_size < 3
            or patch_size % 2 == 0
        ):
            raise UserError(
                f"patch_classifier: patch_size must be an odd integer >= 3, got {patch_size!r}"
            )
        if pad_mode not in PAD_MODES:
            raise unknown_name("pad_mode", pad_mode, PAD_MODES)
        layers: list[nn.Module] = []
        c = in_channels
        for d in dilation_schedule(patch_size):
            layers += [nn.Conv2d(c, width, 3, dilation=d), nn.ReLU(inplace=True)]
            c = width
        self.features = nn.Sequential(*layers)  # (N, C, P, P) -> (N, width, 1, 1), stride 1 only
        self.fc = nn.Linear(width, hidden)
        self.classifier = nn.Linear(hidden, num_classes)
        self.patch_size = patch_size
        self.pad_mode = pad_mode
        self.num_classes = num_classes
        self.in_channels = in_channels

    def _pad(self, images: torch.Tensor) -> torch.Tensor:
        r = self.patch_size // 2
        if self.pad_mode == "zeros":
            return F.pad(images, (r, r, r, r))
        return mirror_pad(images, (r, r, r, r))

    def classify_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """patches (B, C, P, P) -> logits (B, K) of their centre pixels."""
        f = self.features(patches).flatten(1)  # (B, width, 1, 1) -> (B, width)
        return self.classifier(F.relu(self.fc(f)))

    def sliding_window(self, images: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
        """images (N, C, H, W) -> (N, K, H, W) by classifying one P x P patch per pixel,
        `batch_size` patches at a time."""
        n, c, h, w = images.shape
        p = self.patch_size
        windows = self._pad(images).unfold(2, p, 1).unfold(3, p, 1)  # view (N, C, H, W, P, P)
        windows = windows.permute(0, 2, 3, 1, 4, 5)  # view (N, H, W, C, P, P)
        out = images.new_empty(n * h * w, self.num_classes)
        flat = windows.reshape(n * h * w, c, p, p) if n * h * w <= batch_size else None
        for start in range(0, n * h * w, batch_size):
            stop = min(start + batch_size, n * h * w)
            if flat is not None:
                patches = flat[start:stop]
            else:
                # gather this batch's patches (copies B x C x P x P values, not the whole image's)
                pix = torch.arange(start, stop, device=images.device)
                b, rest = pix // (h * w), pix % (h * w)
                patches = windows[b, rest // w, rest % w]  # (B, C, P, P)
            out[start:stop] = self.classify_patches(patches)
        return out.view(n, h, w, self.num_classes).permute(0, 3, 1, 2)  # (N*H*W, K) -> (N, K, H, W)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The same weights, fully convolutionally: (N, C, H, W) -> (N, K, H, W)."""
        f = self.features(self._pad(images))  # (N, width, H, W)
        hid = F.relu(
            F.conv2d(f, self.fc.weight[:, :, None, None], self.fc.bias)
        )  # Linear as 1x1 conv
        return F.conv2d(hid, self.classifier.weight[:, :, None, None], self.classifier.bias)

    def rf_path(self) -> list[nn.Module]:
        return [self.features]
