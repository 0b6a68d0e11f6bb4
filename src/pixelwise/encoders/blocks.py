"""Conv-norm-ReLU blocks shared by the plain encoder and the decoders."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pixelwise.errors import unknown_name

# normalisation after each conv; None = no normalisation (the conv then gets a bias)
NORMS: dict[str, Callable[[int], nn.Module] | None] = {
    "batch": nn.BatchNorm2d,
    "none": None,
}

PADDINGS = ("same", "valid")


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise unknown_name("norm", norm, NORMS)
    return norm


def check_padding(padding: str) -> str:
    if padding not in PADDINGS:
        raise unknown_name("padding", padding, PADDINGS)
    return padding


def conv_norm_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    *,
    padding: str = "same",
    norm: str = "batch",
    dilation: int = 1,
) -> nn.Sequential:
    """Conv (stride 1) -> norm -> ReLU. (N, C_in, H, W) -> (N, C_out, H', W') with H' = H for
    padding "same", H - (k - 1) * dilation for "valid"."""
    norm_layer = NORMS[check_norm(norm)]
    pad = (kernel_size // 2) * dilation if check_padding(padding) == "same" else 0
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            padding=pad,
            dilation=dilation,
            bias=norm_layer is None,
        )
    ]
    if norm_layer is not None:
        layers.append(norm_layer(out_channels))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def conv_block(
    in_channels: int,
    out_channels: int,
    *,
    convs: int = 2,
    padding: str = "same",
    norm: str = "batch",
) -> nn.Sequential:
    """`convs` 3x3 conv-norm-ReLU layers (U-Net's "two 3x3 convolutions, each followed by a ReLU").
    (N, C_in, H, W) -> (N, C_out, H, W) ("same"), or (N, C_out, H - 2 convs, W - 2 convs)
    ("valid")."""
    return nn.Sequential(
        *(
            conv_norm_act(
                in_channels if i == 0 else out_channels, out_channels, 3, padding=padding, norm=norm
            )
            for i in range(convs)
        )
    )
