"""Weights of the zoo networks, offline first: local files, the libraries' caches, downloads.

Weights come from the libraries' caches (``TORCH_HOME``, ``HF_HOME``) or a local ``.pth`` /
``.safetensors`` file; a download that cannot happen is a UserError naming the file and the
cache folder to put it in (``scripts/fetch_weights.py`` fills the caches). The networks that use
them are built in pipeline/models/zoo.py.
"""

from __future__ import annotations

import difflib
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from pipeline.errors import UserError

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
TIMM_INSTALL = "pip install -e '.[timm]' (or pip install timm)"


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
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return _zoo_body(state) if _is_pipeline_checkpoint(state) else state


def _is_pipeline_checkpoint(state: dict[str, torch.Tensor]) -> bool:
    """The tensors of one of our own checkpoints of a zoo network (``model.ckpt`` of
    `stage=pretrain` or of a round): ``net.features.*`` (the zoo model) and ``net.head.*``."""
    return bool(state) and all(k.startswith(("net.features.", "net.head.")) for k in state)


def _zoo_body(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our checkpoint's zoo model, keyed as the zoo names it (its head is dropped: a new one is
    built for the data)."""
    prefix = "net.features."
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def has_small_image_stem(state: dict[str, torch.Tensor], net: nn.Module) -> bool:
    """Whether a weights file comes from a network with the small-image stem (a single 3x3
    ``conv1`` as wide as ``bn1``), e.g. our own pretraining with ``model.net.small_images=true``:
    its stem is then loaded, not replaced by a fresh one."""
    conv, bn = state.get("conv1.weight"), getattr(net, "bn1", None)
    return (
        conv is not None
        and conv.ndim == 4
        and tuple(conv.shape[2:]) == (3, 3)
        and isinstance(bn, nn.BatchNorm2d)
        and conv.shape[0] == bn.num_features
        and not any(k.startswith("conv1.") and k != "conv1.weight" for k in state)
        and getattr(net, "maxpool", None) is not None
    )


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
