"""Examples shown at the end of each sub-command's ``--help``."""
from __future__ import annotations

EXAMPLES: dict[str, list[str]] = {
    "pretrain": [
        "sharp-unlearn pretrain optimizer.name=sam optimizer.rho=0.05 train.epochs=20",
        "sharp-unlearn pretrain --no-tracking data.name=cifar10 data.root=~/data model.name=resnet18",
    ],
    "unlearn": [
        "sharp-unlearn unlearn --checkpoint runs/pretrain/RUN/checkpoint.pt method.name=sharp_minmax "
        "forget.kind=random forget.size=100",
        "sharp-unlearn unlearn --checkpoint CKPT method.name=neggrad optimizer.name=sam forget.kind=class "
        "'forget.classes=[3]'",
    ],
    "retrain": [
        "sharp-unlearn retrain --checkpoint runs/pretrain/RUN/checkpoint.pt forget.kind=random forget.size=100",
    ],
    "mask": [
        "sharp-unlearn mask --checkpoint CKPT --fractions 0.1,0.3,0.5 forget.kind=random forget.size=100",
    ],
    "evaluate": [
        "sharp-unlearn evaluate --checkpoint runs/unlearn/RUN/checkpoint.pt",
        "sharp-unlearn evaluate --checkpoint CKPT --metrics mia,landscape,umap --out runs/eval",
    ],
    "memorization": [
        "sharp-unlearn memorization --models 24 --out runs/memo",
        "sharp-unlearn memorization --proxies-only --proxies all",
    ],
    "convert": [
        "sharp-unlearn convert --out data/digits-parquet data.name=digits",
    ],
    "demo": [
        "sharp-unlearn demo",
        "sharp-unlearn demo --no-tracking --methods finetune,sharp_minmax base.train.epochs=10",
    ],
    "reproduce": [
        "sharp-unlearn reproduce theory",
        "sharp-unlearn reproduce table --seeds 0,1,2",
    ],
    "sweep": [
        "sharp-unlearn sweep tuning/smoke.yaml",
        "sharp-unlearn sweep tuning/smoke.yaml --num-samples 4 --max-concurrent 2",
    ],
    "compare": [
        "sharp-unlearn compare --filter \"tags.kind = 'unlearn'\" --out runs/compare",
        "sharp-unlearn compare --experiment sharp-unlearn --no-log",
    ],
    "config": [
        "sharp-unlearn config show optimizer.name=sam train.epochs=5",
        "sharp-unlearn config show --command unlearn --checkpoint CKPT method.name=neggrad",
        "sharp-unlearn config show --command demo base.train.epochs=10",
    ],
}


def epilog(name: str) -> str | None:
    examples = EXAMPLES.get(name)
    if not examples:
        return None
    return "examples:\n" + "\n".join(f"  {line}" for line in examples)
