"""What `python -m pipeline --help` lists: the stages, one line each, and the config groups a
user picks from. conf/hydra/help/pipeline.yaml (Hydra's own help config) lays the page out and
calls these through two resolvers, so the lists follow pipeline/stages.py and conf/ as they
grow; nothing here imports torch.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from pipeline.config.paths import CONF_DIR
from pipeline.stages import STAGES

# One line per stage of pipeline/stages.py (tests/test_packaging.py checks that they agree).
STAGE_HELP = {
    "selftrain": "the whole loop: teacher, pseudo-labels, merge, students (the default)",
    "train": "train and evaluate one model on the labelled split [pseudo_in=PL.npz]",
    "pseudolabel": "label the unlabelled set with a checkpoint: ckpt=M.ckpt out=PL.npz",
    "merge": "the student's training set from the labels and pseudo_in=PL.npz",
    "evaluate": "test accuracy of a checkpoint: ckpt=M.ckpt",
    "pretrain": "supervised pretraining on pretrain_data (the baseline's source)",
    "finetune": "fine-tune ckpt=M.ckpt on the labelled split (finetune.mode=full|linear|...)",
    "baseline": "pretrain, fine-tune, evaluate (the supervised-pretraining baseline)",
    "report": "tables, CSV and plots of a sweep: report.sweep_dir=DIR",
    "predict": "classify new images: ckpt=M.ckpt input=DIR out=P.csv",
    "export": "the model as ONNX or TorchScript: ckpt=M.ckpt format=onnx|torchscript",
}


def stage_lines() -> str:
    """`stage=NAME  what it does`, one line per stage, in pipeline/stages.py's order."""
    width = max(len(name) for name in STAGES)
    return "\n".join(
        f"  stage={name.ljust(width)}  {STAGE_HELP.get(name, '')}".rstrip() for name in STAGES
    )


def config_groups() -> dict[str, list[str]]:
    """The config groups of conf/ and their options, without Hydra's own (conf/hydra/) and
    without the bases other options build on (names starting with `_`)."""
    groups = {}
    for folder in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"):
        options = sorted(f.stem for f in folder.glob("*.yaml") if not f.stem.startswith("_"))
        if options:
            groups[folder.name] = options
    return groups


def group_lines() -> str:
    """`group: option, option, ...`, one line per config group."""
    return "\n".join(
        f"  {group}: {', '.join(options)}" for group, options in config_groups().items()
    )


def register_resolvers() -> None:
    """`${pipeline_stages:}` and `${pipeline_groups:}`, used by conf/hydra/help/pipeline.yaml."""
    for name, fn in {"pipeline_stages": stage_lines, "pipeline_groups": group_lines}.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
