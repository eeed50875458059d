"""What `finetune backbones [NAME]` prints: the catalogue table, or one backbone with its taps and stages.

print(catalogue_text())                        # one row per alias, with its weights status
print(describe("vgg16", show_taps=True))       # taps with their output shapes
"""

from __future__ import annotations

from finetune.console import text_table
from finetune.models.backbone import _meta_model, _preprocessing_of, num_parameters
from finetune.models.catalogue import ALIASES, resolve
from finetune.models.fetch import MIRROR_VAR, cached_file, hf_cache_dir, published, status, torch_hub_dir


def catalogue_rows() -> list[dict]:
    """One row per alias: name, family, model, parameters, input size, weights status.

    Parameters are counted on the meta device (no memory, no weights): about 0.1 s per network.
    """
    rows = []
    for spec in ALIASES.values():
        model = _meta_model(spec)
        pre = _preprocessing_of(spec, model)
        rows.append(
            {
                "name": spec.name,
                "family": spec.family,
                "model": spec.model,
                "params": num_parameters(model),
                "input": pre.input_size,
                "min_input": spec.min_input,
                "weights": status(spec),
            }
        )
    return rows


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def catalogue_text() -> str:
    """The `finetune backbones` table, plus where weights come from."""
    rows = [
        [r["name"], r["family"], r["model"], _millions(r["params"]), str(r["input"]), r["weights"]]
        for r in catalogue_rows()
    ]
    table = text_table(["name", "family", "model", "params", "input", "weights"], rows, right=(3, 4))
    return (
        f"{table}\n\nAny timm name (resnet50d, vgg16.tv_in1k) or torchvision name (tv:alexnet) works too."
        "\n"
        "Weights, in order: --weights FILE, packaged, the frameworks' caches "
        f"({hf_cache_dir()}, {torch_hub_dir()}/checkpoints), else downloaded on first use\n"
        f"(Hugging Face Hub: HF_ENDPOINT for a mirror; URLs: {MIRROR_VAR}); `finetune fetch NAME` downloads "
        "ahead, --offline uses only the caches; --no-pretrained for random init."
    )


def describe(
    name: str, show_taps: bool = False, show_stages: bool = False, input_size: int | None = None
) -> str:
    """What `finetune backbones NAME` prints: the row, and optionally taps with shapes or stages with sizes.

    Raises:
        BackboneError: unknown name (with suggestions).
    """
    from finetune.models import anatomy

    spec = resolve(name)
    model = _meta_model(spec)
    pre = _preprocessing_of(spec, model)
    size = max(input_size or pre.input_size, spec.min_input)
    src = published(spec)
    found = cached_file(src) if src is not None else None
    state = status(spec)
    if found:
        state += f": {found}"
    elif src is not None and state != "packaged":
        state += f": {src.label}, into {src.where} (`finetune fetch {spec.name}`)"
    params = _millions(num_parameters(model))
    lines = [
        f"{spec.name}: {spec.model} ({spec.family or spec.source}), {params} parameters",
        f"input {pre.input_size} px (min {spec.min_input}), crop {pre.crop_pct:g}, mean {pre.mean}, "
        f"std {pre.std}, {pre.interpolation}",
        f"weights: {state}",
    ]
    if spec.notes:
        lines.append(f"notes: {spec.notes}")
    if show_taps:
        shapes = anatomy.tap_shapes(model, size)
        lines.append(f"\ntaps at {size} px (unpooled output shape):")
        lines.append(text_table(["tap", "shape"], [[t, " x ".join(map(str, s))] for t, s in shapes.items()]))
    if show_stages:
        sizes = dict((n, p.numel()) for n, p in model.named_parameters())
        rows = [[s.name, str(s.size), f"{sum(sizes[p] for p in s.params):,}"] for s in anatomy.stages(model)]
        lines.append("\nstages, bottom -> top:")
        lines.append(text_table(["stage", "tensors", "params"], rows, right=(1, 2)))
    return "\n".join(lines)
