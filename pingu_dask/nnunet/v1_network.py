"""An nnU-Net v1 network as a v2 PlainConvUNet: its architecture read from the v1 weights,
the v2 network built for it, and the weights copied across (every parameter exactly once).
"""

from __future__ import annotations

from dataclasses import dataclass

from pingu_dask.errors import ModelError


@dataclass(frozen=True)
class Architecture:
    """Generic_UNet's shape, read from its weights."""

    features: tuple[int, ...]  # per encoder stage
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]  # first stage (1, ...), then the plans' pooling
    convs_encoder: tuple[int, ...]
    convs_decoder: tuple[int, ...]
    in_channels: int
    n_classes: int  # including background

    @property
    def dimensions(self) -> int:
        return len(self.kernel_sizes[0])


def _encoder_blocks(weights: dict, stage: int, last: bool) -> list[str]:
    """v1 key prefixes of one encoder stage's convolutions, in order."""
    if not last:
        return _blocks(weights, f"conv_blocks_context.{stage}.blocks")
    return [
        *_blocks(weights, f"conv_blocks_context.{stage}.0.blocks"),
        *_blocks(weights, f"conv_blocks_context.{stage}.1.blocks"),
    ]


def _decoder_blocks(weights: dict, stage: int) -> list[str]:
    return [
        *_blocks(weights, f"conv_blocks_localization.{stage}.0.blocks"),
        *_blocks(weights, f"conv_blocks_localization.{stage}.1.blocks"),
    ]


def _blocks(weights: dict, prefix: str) -> list[str]:
    count = 0
    while f"{prefix}.{count}.conv.weight" in weights:
        count += 1
    return [f"{prefix}.{k}" for k in range(count)]


def read_architecture(weights: dict, stage_plans: dict) -> Architecture:
    """The network's shape from a v1 state dict, checked against the stage's plans."""
    pools = [tuple(int(x) for x in p) for p in stage_plans["pool_op_kernel_sizes"]]
    n_stages = len(pools) + 1
    encoder = [_encoder_blocks(weights, s, s == n_stages - 1) for s in range(n_stages)]
    decoder = [_decoder_blocks(weights, u) for u in range(n_stages - 1)]
    if not all(encoder) or not all(decoder) or f"tu.{n_stages - 2}.weight" not in weights:
        raise ModelError(
            "the weights do not have nnU-Net v1's Generic_UNet layout for "
            f"{n_stages} stages (conv_blocks_context, conv_blocks_localization, tu, seg_outputs)"
        )
    first = [weights[f"{blocks[0]}.conv.weight"] for blocks in encoder]
    kernels = tuple(tuple(int(k) for k in w.shape[2:]) for w in first)
    planned = tuple(tuple(int(k) for k in c) for c in stage_plans["conv_kernel_sizes"])
    if kernels != planned:
        raise ModelError(f"kernel sizes in the weights {kernels} differ from the plans' {planned}")
    for u, blocks in enumerate(decoder):
        # v1 gives decoder stage u the kernel of the stage below the skip connection,
        # v2's PlainConvUNet the skip's own: the same only where they agree.
        used = tuple(int(k) for k in weights[f"{blocks[0]}.conv.weight"].shape[2:])
        if used != kernels[-(u + 2)]:
            raise ModelError(
                f"v1 decoder stage {u} uses kernel {used} where nnU-Net v2's PlainConvUNet "
                f"uses {kernels[-(u + 2)]} (plans with different kernel sizes per stage): "
                "the network cannot be expressed in v2"
            )
    expected = {
        f"{block}.{part}.{kind}"
        for blocks in (*encoder, *decoder)
        for block in blocks
        for part in ("conv", "instnorm")
        for kind in ("weight", "bias")
    }
    expected |= {f"tu.{u}.weight" for u in range(n_stages - 1)}
    expected |= {f"seg_outputs.{u}.weight" for u in range(n_stages - 1)}
    unexpected = sorted(set(weights) - expected)
    missing = sorted(expected - set(weights))
    if unexpected or missing:
        raise ModelError(
            "the weights are not a plain Generic_UNet (dropout, biases or extra layers?): "
            f"unexpected {unexpected[:5]}, missing {missing[:5]}"
        )
    dimensions = len(kernels[0])
    return Architecture(
        features=tuple(int(w.shape[0]) for w in first),
        kernel_sizes=kernels,
        strides=((1,) * dimensions, *pools),
        convs_encoder=tuple(len(blocks) for blocks in encoder),
        convs_decoder=tuple(len(blocks) for blocks in decoder),
        in_channels=int(first[0].shape[1]),
        n_classes=int(weights[f"seg_outputs.{n_stages - 2}.weight"].shape[0]),
    )


def arch_kwargs(architecture: Architecture) -> dict:
    """plans.json's architecture entry for v2's PlainConvUNet of the same shape."""
    d = architecture.dimensions
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": len(architecture.features),
            "features_per_stage": list(architecture.features),
            "conv_op": f"torch.nn.modules.conv.Conv{d}d",
            "kernel_sizes": [list(k) for k in architecture.kernel_sizes],
            "strides": [list(s) for s in architecture.strides],
            "n_conv_per_stage": list(architecture.convs_encoder),
            "n_conv_per_stage_decoder": list(architecture.convs_decoder),
            "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{d}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",  # v1: negative slope 0.01, v2's default
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def v2_network(architecture: Architecture):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    entry = arch_kwargs(architecture)
    return get_network_from_plans(
        entry["network_class_name"],
        entry["arch_kwargs"],
        entry["_kw_requires_import"],
        architecture.in_channels,
        architecture.n_classes,
        allow_init=False,
        deep_supervision=False,
    )


def copy_weights(weights: dict, network, architecture: Architecture) -> None:
    """Put v1's weights into the v2 network; every parameter must be set exactly once."""
    import torch

    n_stages = len(architecture.features)
    assigned: set[int] = set()

    def put(parameter, value) -> None:
        if tuple(parameter.shape) != tuple(value.shape):
            raise ModelError(f"shape {tuple(value.shape)} does not fit {tuple(parameter.shape)}")
        with torch.no_grad():
            parameter.copy_(value)
        assigned.add(id(parameter))

    def put_block(v1_prefix: str, module) -> None:
        put(module.conv.weight, weights[f"{v1_prefix}.conv.weight"])
        put(module.conv.bias, weights[f"{v1_prefix}.conv.bias"])
        put(module.norm.weight, weights[f"{v1_prefix}.instnorm.weight"])
        put(module.norm.bias, weights[f"{v1_prefix}.instnorm.bias"])

    for s in range(n_stages):
        convs = network.encoder.stages[s][0].convs
        for block, module in zip(
            _encoder_blocks(weights, s, s == n_stages - 1), convs, strict=True
        ):
            put_block(block, module)
    decoder = network.decoder
    for u in range(n_stages - 1):
        for block, module in zip(_decoder_blocks(weights, u), decoder.stages[u].convs, strict=True):
            put_block(block, module)
        put(decoder.transpconvs[u].weight, weights[f"tu.{u}.weight"])
        put(decoder.seg_layers[u].weight, weights[f"seg_outputs.{u}.weight"])
        for layer in (decoder.transpconvs[u], decoder.seg_layers[u]):  # v1 has no bias here
            if layer.bias is not None:
                put(layer.bias, torch.zeros_like(layer.bias))
    left = [name for name, p in network.named_parameters() if id(p) not in assigned]
    if left:
        raise ModelError(f"v2 parameters not set from the v1 weights: {left[:5]}")
