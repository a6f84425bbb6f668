"""Networks from the model zoos: any torchvision or timm classifier by name.

    python -m pipeline model=torchvision model.name=convnext_tiny model.weights=DEFAULT
    python -m pipeline model=timm model.name=resnet10t model.pretrained=true
    python -m pipeline model=timm model.name=resnet10t model.weights=/path/resnet10t.safetensors

The zoo network becomes ``features`` of a `ZooClassifier` with its classifier layer removed
(torchvision: the last ``nn.Linear`` becomes ``nn.Identity``; timm: ``num_classes=0``), and
``head`` is a new ``nn.Linear`` for the data's classes, so fine-tuning, checkpoints and export
treat it like the pipeline's own networks. The input is adapted to the data: grayscale data
goes into a 3-channel stem as timm's ``adapt_input_conv`` does it (pretrained kernels summed
over the colour axis), and ``small_images`` swaps a ResNet-like stem for a 3x3 stride-1 conv
without max-pool. ``blocks()`` are the zoo's own stages (timm's ``group_matcher``; torchvision's
top-level stages), for ``finetune.mode=last_layers`` and ``finetune.layer_decay``.

Offline first: weights come from the libraries' caches (``TORCH_HOME``, ``HF_HOME``) or a local
``.pth`` / ``.safetensors`` file; a download that cannot happen is a UserError naming the file
and the cache folder to put it in (``scripts/fetch_weights.py`` fills the caches).
"""

from __future__ import annotations

import difflib
import math
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from pipeline.errors import UserError
from pipeline.models.base import Classifier, check_positive_int, check_probability

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
# torchvision's containers of stages, in the order they are looked for (see `_torchvision_groups`)
TORCHVISION_STAGES = ("features", "encoder.layers", "trunk_output", "blocks", "layers")
# torchvision builders whose auxiliary classifiers are on by default without weights
AUX_LOGITS = ("googlenet", "inception_v3")
TIMM_INSTALL = "pip install -e '.[timm]' (or pip install timm)"


class _Block(nn.Module):
    """A view of some modules and loose parameters of a network, for freezing and lr groups.

    Built on demand by `ZooClassifier.blocks`; never part of the network's module tree, so it
    changes no state_dict key."""

    def __init__(self, modules: list[nn.Module], params: list[nn.Parameter]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(modules)
        self.loose = nn.ParameterList(params)


def _block(body: nn.Module, names: list[str]) -> _Block:
    """The smallest set of whole modules (plus loose parameters) holding exactly `names`."""
    wanted = set(names)
    params = dict(body.named_parameters())
    modules: list[nn.Module] = []
    covered: set[str] = set()
    taken: list[str] = []
    for path, module in body.named_modules():
        if not path or any(path.startswith(t + ".") for t in taken):
            continue
        own = [f"{path}.{n}" for n, _ in module.named_parameters()]
        if own and all(n in wanted for n in own):
            modules.append(module)
            covered.update(own)
            taken.append(path)
    loose = [params[n] for n in names if n not in covered]
    return _Block(modules, loose)


class ZooClassifier(Classifier):
    """A torchvision or timm network as ``features`` (its classifier removed) plus a new
    ``head``. ``groups``: the parameter names of ``features``'s stages, input first."""

    def __init__(
        self,
        body: nn.Module,
        num_features: int,
        num_classes: int,
        in_channels: int,
        groups: list[list[str]],
    ) -> None:
        super().__init__(num_classes, in_channels)
        self.features = body
        self.head = nn.Linear(num_features, self.num_classes)
        self.groups = [list(g) for g in groups if g]

    def blocks(self) -> list[nn.Module]:
        return [_block(self.features, names) for names in self.groups]


# ---------------------------------------------------------------------------------------------
# shared helpers


def adapt_input_conv(in_chans: int, conv_weight: torch.Tensor) -> torch.Tensor:
    """A 3-channel first-conv kernel for `in_chans` input channels, exactly as timm's
    ``adapt_input_conv``: one channel sums the RGB kernels (a gray image then gives the
    activations of the same image repeated on R, G and B); other counts repeat the RGB kernels
    cyclically, scaled by 3 / in_chans. (Written out here: torchvision must work without timm.)"""
    dtype = conv_weight.dtype
    weight = conv_weight.float()
    out, channels, kh, kw = weight.shape
    if in_chans == 1:
        if channels > 3:
            if channels % 3:
                raise UserError(f"cannot adapt a {channels}-channel first conv to 1 channel")
            weight = weight.reshape(out, channels // 3, 3, kh, kw).sum(dim=2)
        else:
            weight = weight.sum(dim=1, keepdim=True)
    elif in_chans != 3:
        if channels != 3:
            raise UserError(f"cannot adapt a {channels}-channel first conv to {in_chans} channels")
        repeat = math.ceil(in_chans / 3)
        weight = weight.repeat(1, repeat, 1, 1)[:, :in_chans] * (3 / float(in_chans))
    return weight.to(dtype)


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _adapt_first_conv(net: nn.Module, in_channels: int) -> None:
    """Replace the first conv (the stem) by one taking `in_channels`, adapting its kernels."""
    path, conv = next(
        ((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)), (None, None)
    )
    if conv is None or conv.in_channels == in_channels:
        return
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        new.weight.copy_(adapt_input_conv(in_channels, conv.weight))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    _set_module(net, path, new)


def _small_image_stem(net: nn.Module, in_channels: int, name: str) -> None:
    """ResNet-like stem (``conv1`` ... ``maxpool``) -> a 3x3 stride-1 conv, no max-pool (freshly
    initialised, as pipeline/models/resnet.py does for resnet18)."""
    bn = getattr(net, "bn1", None)
    if not hasattr(net, "conv1") or not hasattr(net, "maxpool") or bn is None:
        raise UserError(
            f"model.name={name} has no small-image stem option (only ResNet-like networks, with "
            "conv1 and maxpool, have one); set model.small_images=false and use a larger "
            "data.image_size (e.g. 32 or more)"
        )
    net.conv1 = nn.Conv2d(in_channels, bn.num_features, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()


def _unknown_name(zoo: str, name: str, known: list[str]) -> UserError:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else f"see {zoo}'s list of models"
    return UserError(f"unknown {zoo} model {name!r}; {hint} (model={zoo} model.name=NAME)")


def is_weights_file(weights: object) -> bool:
    """Whether `model.weights` names a local file (not a torchvision enum name)."""
    text = str(weights)
    return "/" in text or os.sep in text or text.lower().endswith(WEIGHT_SUFFIXES)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A weights file's tensors: ``.safetensors``, or a torch file loaded with
    ``weights_only=True`` (a plain state dict, or one under ``state_dict`` / ``model``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"model.weights={path}: no such file; give a .pth or .safetensors file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError(
                f"model.weights={path} needs safetensors: pip install safetensors"
            ) from None
        return load_file(str(path), device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"model.weights={path} is not a readable weights file ({e})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"model.weights={path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_body(net: nn.Module, state: dict[str, torch.Tensor], drop: list[str], what: str) -> None:
    """Load `state` into `net` strictly, except the classifier keys `drop` (replaced anyway)."""
    state = {k: v for k, v in state.items() if not any(k.startswith(d + ".") for d in drop)}
    own = {
        k: v for k, v in net.state_dict().items() if not any(k.startswith(d + ".") for d in drop)
    }
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
    problems = [f"{k} missing" for k in missing] + [f"{k} unexpected" for k in extra]
    problems += [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shapes]
    if problems:
        shown = "; ".join(problems[:4]) + (
            f"; and {len(problems) - 4} more" if len(problems) > 4 else ""
        )
        raise UserError(f"{what} does not fit the network: {shown}")
    net.load_state_dict(state, strict=False)


def _unreachable(what: str, filename: str, folder: Path, fetch: str, repo: str = "") -> UserError:
    """Weights that are not cached and cannot be downloaded: where to put them, how."""
    where = f"{filename} of {repo}" if repo else filename
    return UserError(
        f"cannot download {what} (no network?): {where} is not in the cache {folder}; fill it "
        f"with `python scripts/fetch_weights.py {fetch}` where there is a network (same "
        "TORCH_HOME / HF_HOME), or pass model.weights=PATH to a local .pth/.safetensors file"
    )


def torch_cache_dir() -> Path:
    """Where torchvision (and timm's URL weights) keep downloaded files (``TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read now (``HF_HUB_CACHE``, else ``HF_HOME``/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = (
        os.environ.get("HF_HOME")
        or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    )
    return Path(home).expanduser() / "hub"


# ---------------------------------------------------------------------------------------------
# torchvision


def torchvision_names() -> list[str]:
    """The classification models of torchvision.models."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def torchvision_weights(name: str, weights: str) -> torchvision.models.WeightsEnum:
    """The weights enum member `weights` (a member name or ``DEFAULT``) of model `name`."""
    enum = torchvision.models.get_model_weights(name)
    if weights == "DEFAULT":
        return enum.DEFAULT
    if weights not in enum.__members__:
        valid = ", ".join(["DEFAULT", *enum.__members__])
        raise UserError(
            f"unknown {name} weights {weights!r}; use one of: {valid}, a .pth/.safetensors "
            "file, or null for random init"
        )
    return enum[weights]


def fetch_torchvision(name: str, weights: str) -> Path:
    """The cached file of torchvision weights (downloaded if missing); UserError offline."""
    if name not in torchvision_names():
        raise _unknown_name("torchvision", name, torchvision_names())
    w = torchvision_weights(name, weights)
    path = torch_cache_dir() / os.path.basename(urlparse(w.url).path)
    error = _unreachable(
        f"torchvision weights {w}", path.name, path.parent, f"torchvision:{name}:{w.name}"
    )
    if path.is_file():
        return path
    _check_reachable(w.url, error)
    try:
        w.get_state_dict(progress=False, check_hash=True)
    except OSError:  # URLError is one: the network went away
        raise error from None
    return path


def _torchvision_classifier(net: nn.Module, name: str) -> tuple[str, nn.Linear]:
    """The classifier layer: the last ``nn.Linear`` (fc, classifier[-1], heads.head, head)."""
    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(
            f"torchvision model {name} has no linear classifier layer to replace (e.g. "
            "squeezenet); choose another model.name"
        )
    return linears[-1]


def _has_children(module: nn.Module) -> bool:
    return any(True for _ in module.children())


def _torchvision_groups(net: nn.Module) -> list[list[str]]:
    """The stages of a torchvision network (its classifier already removed), as parameter
    names: the children of its stage container (``features`` for VGG, MobileNet, EfficientNet,
    ConvNeXt, DenseNet, Swin; ``encoder.layers`` for ViT; ``trunk_output`` for RegNet;
    ``blocks`` for MaxViT; ``layers`` for MNASNet), what comes before it as one stem block and
    what comes after it joined to the last stage. Without a container (ResNet, GoogLeNet,
    ShuffleNet...) the top-level children are the stages, leading plain layers (conv1, bn1)
    forming the stem."""
    names = [n for n, _ in net.named_parameters()]

    def under(prefix: str) -> list[str]:
        return [n for n in names if n.startswith(prefix + ".")]

    container = None
    for path in TORCHVISION_STAGES:
        try:
            module = net.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.Sequential | nn.ModuleList) and len(under(path)):
            container = path
            break
    if container is not None:
        children = [f"{container}.{c}" for c, _ in net.get_submodule(container).named_children()]
        stages = [g for g in (under(c) for c in children) if g]
        inside = {n for g in stages for n in g}
        first = names.index(stages[0][0])
        before = [n for n in names[:first] if n not in inside]
        after = [n for n in names[first:] if n not in inside]
        stages[-1] = stages[-1] + after
        return ([before] if before else []) + stages
    groups: list[list[str]] = [[n for n in names if "." not in n]]  # root-level parameters
    stem_open = True
    for child, module in net.named_children():
        params = under(child)
        if not params:
            continue
        if not _has_children(module):  # a plain layer: the stem's, or the stage's before it
            groups[0 if stem_open else -1] += params
        else:
            stem_open = False
            groups.append(params)
    return [g for g in groups if g]


def torchvision_model(
    num_classes: int,
    in_channels: int = 3,
    name: str = "resnet18",
    weights: str | None = None,
    small_images: bool = False,
) -> ZooClassifier:
    """Any torchvision classification model by name, with a new head for `num_classes`.

    - ``weights``: a weights enum member of the model (``IMAGENET1K_V1``, ``DEFAULT``), taken
      from torchvision's cache (``TORCH_HOME``; a missing file is a UserError naming it), a
      local ``.pth`` / ``.safetensors`` file of the torchvision model's state dict, or None.
    - ``in_channels != 3``: the first conv's kernels adapted (`adapt_input_conv`).
    - ``small_images``: ResNet-like stem -> 3x3 stride-1 conv without max-pool.
    """
    check_positive_int("num_classes", num_classes)
    in_channels = check_positive_int("in_channels", in_channels)
    known = torchvision_names()
    if name not in known:
        raise _unknown_name("torchvision", name, known)
    kwargs: dict[str, Any] = {}
    if weights is None or is_weights_file(weights):
        if name in AUX_LOGITS:
            kwargs["aux_logits"] = False
        net = torchvision.models.get_model(name, weights=None, **kwargs)
        if weights is not None:
            classifier, _ = _torchvision_classifier(net, name)
            _load_body(net, read_state_dict(weights), [classifier], f"model.weights={weights}")
    else:
        w = torchvision_weights(name, str(weights))
        fetch_torchvision(name, w.name)  # the cached file, or a UserError naming it
        net = torchvision.models.get_model(name, weights=w)  # (from the cache)
    _adapt_first_conv(net, in_channels)
    if in_channels != 3 and getattr(net, "transform_input", False):
        net.transform_input = False  # (GoogLeNet, Inception: re-normalises 3 RGB channels)
    if small_images:
        _small_image_stem(net, in_channels, name)
    path, linear = _torchvision_classifier(net, name)
    _set_module(net, path, nn.Identity())
    return ZooClassifier(
        net, linear.in_features, num_classes, in_channels, _torchvision_groups(net)
    )


def _check_reachable(url: str, error: UserError, hub: bool = False) -> None:
    """Raise `error` at once when the weights' host cannot be reached (before the libraries
    print a download line, or the hub client retries for about a minute), or for the hub when
    HF_HUB_OFFLINE says not to try."""
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    if hub and os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no"):
        raise error
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError:
        raise error from None


# ---------------------------------------------------------------------------------------------
# timm


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise UserError(f"model=timm needs timm: {TIMM_INSTALL}") from None
    return timm


def timm_names() -> list[str]:
    """Every timm model name (without pretrained tags)."""
    return sorted(_timm().list_models())


def _timm_cached_file(cfg: dict[str, Any]) -> tuple[Path | None, str, Path, str | None]:
    """(the cached weights file or None, its file name, the cache folder, the hub repo)."""
    repo = cfg.get("hf_hub_id")
    if repo:
        from huggingface_hub import try_to_load_from_cache

        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else [
            "model.safetensors", "pytorch_model.bin"]  # fmt: skip
        for filename in names:
            hit = try_to_load_from_cache(repo, filename, cache_dir=hf_cache_dir())
            if isinstance(hit, str):
                return Path(hit), filename, hf_cache_dir(), repo
        return None, names[0], hf_cache_dir(), repo
    url = cfg.get("url")
    if url:
        filename = os.path.basename(urlparse(url).path)
        path = torch_cache_dir() / filename
        return (path if path.is_file() else None), filename, torch_cache_dir(), None
    return None, "", Path(), None


def fetch_timm(name: str) -> Path:
    """The cached file of timm's pretrained weights for `name` (``arch`` or ``arch.tag``),
    downloaded into the hub cache (``HF_HOME``) or torch's (``TORCH_HOME``) if missing."""
    timm = _timm()
    if not timm.is_model(name):
        raise _unknown_name("timm", name, timm_names())
    cfg = timm.create_model(name, pretrained=False, num_classes=0).pretrained_cfg
    cached, filename, folder, repo = _timm_cached_file(cfg)
    if cached is not None:
        return cached
    if not filename:
        raise UserError(f"timm model {name} has no pretrained weights; use model.pretrained=false")
    error = _unreachable(f"timm weights of {name}", filename, folder, f"timm:{name}", repo or "")
    if repo:
        from huggingface_hub import constants, hf_hub_download

        _check_reachable(constants.ENDPOINT, error, hub=True)
        try:
            return Path(hf_hub_download(repo, filename, cache_dir=hf_cache_dir()))
        except OSError:
            raise error from None
    _check_reachable(cfg["url"], error)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(cfg["url"], str(folder / filename), progress=False)
    except OSError:
        raise error from None
    return folder / filename


def timm_model(
    num_classes: int,
    in_channels: int = 3,
    name: str = "resnet18",
    pretrained: bool = False,
    weights: str | None = None,
    small_images: bool = False,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
) -> ZooClassifier:
    """Any timm model by name (``arch`` or ``arch.tag``), with a new head for `num_classes`.

    - ``pretrained``: timm's weights for the name, from the caches (``HF_HOME``, ``TORCH_HOME``;
      downloaded only where there is a network, else a UserError naming the file).
    - ``weights``: a local ``.pth`` / ``.safetensors`` file of the timm model's state dict
      (implies pretrained).
    - ``in_channels``: timm's ``in_chans`` (pretrained kernels adapted like timm does).
    - ``small_images``: ResNet-like stem -> 3x3 stride-1 conv without max-pool.
    - ``drop_rate``, ``drop_path_rate``: timm's dropout and stochastic depth (student noise).
    """
    timm = _timm()
    check_positive_int("num_classes", num_classes)
    in_channels = check_positive_int("in_channels", in_channels)
    if not timm.is_model(name):
        raise _unknown_name("timm", name, timm_names())
    extra: dict[str, Any] = {}
    if check_probability("drop_rate", drop_rate):
        extra["drop_rate"] = float(drop_rate)
    if check_probability("drop_path_rate", drop_path_rate):
        extra["drop_path_rate"] = float(drop_path_rate)
    net = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels, **extra)
    cfg = dict(net.pretrained_cfg)
    file = weights if weights is not None else (fetch_timm(name) if pretrained else None)
    if file is not None:
        state = read_state_dict(file)
        for conv in _as_list(cfg.get("first_conv")):  # as timm's load_pretrained does
            key = f"{conv}.weight"
            if key in state and state[key].ndim == 4 and state[key].shape[1] != in_channels:
                state[key] = adapt_input_conv(in_channels, state[key])
        _load_body(net, state, _as_list(cfg.get("classifier")), f"timm weights {file}")
    if small_images:
        _small_image_stem(net, in_channels, name)
    groups = _timm_groups(net, cfg)
    width = getattr(net, "head_hidden_size", None) or net.num_features
    return ZooClassifier(net, int(width), num_classes, in_channels, groups)


def _as_list(names: str | list[str] | tuple[str, ...] | None) -> list[str]:
    return [names] if isinstance(names, str) else list(names or [])


def _timm_groups(net: nn.Module, cfg: dict[str, Any]) -> list[list[str]]:
    """timm's own coarse stages (``group_matcher(coarse=True)``: the grouping timm's layer
    decay uses); what is left of the head (a norm, pre-logits) joins the last stage."""
    from timm.models import group_parameters

    try:
        groups = [list(g) for g in group_parameters(net, net.group_matcher(coarse=True)).values()]
    except (AttributeError, NotImplementedError):
        return _torchvision_groups(net)
    head = (_as_list(cfg.get("classifier")) or [""])[0].rpartition(".")[0]
    if head and len(groups) > 1 and all(n.startswith(head + ".") for n in groups[-1]):
        last = groups.pop()
        groups[-1] += last
    return groups


# The zoo constructors, for models/__init__.py's NETWORKS (checkpoints rebuild them offline).
ZOO: dict[str, Callable[..., ZooClassifier]] = {
    "torchvision_model": torchvision_model,
    "timm_model": timm_model,
}
