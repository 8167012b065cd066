"""UMAP figures of retain vs forget features."""
from __future__ import annotations

import pytest
import torch

from sharp_unlearn.data import IndexedTensorDataset
from sharp_unlearn.metrics import METRICS, EvalContext, EvalOptions
from sharp_unlearn.models.mlp import MLP


@pytest.mark.slow  # UMAP's first call JIT-compiles numba kernels (~10-30 s)
def test_umap_writes_both_figures_and_respects_the_cap(tmp_path):
    torch.manual_seed(0)
    model = MLP(num_classes=3, input_shape=(6,), hidden=(8,))
    retain = IndexedTensorDataset(torch.randn(300, 6), torch.randint(0, 3, (300,)))
    forget = IndexedTensorDataset(torch.randn(60, 6), torch.tensor([2] * 40 + [0] * 20))
    ctx = EvalContext(model, {"retain": retain, "forget": forget}, out_dir=tmp_path,
                      options=EvalOptions(umap_max_per_set=100))
    result = METRICS.get("umap").fn(ctx)
    names = sorted(p.name for p in result.artifacts)
    assert names == ["umap_all.png", "umap_class2.png"]  # class 2 is the largest forget class
    for path in result.artifacts:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert result.details["umap"] == {"retain_points": 100, "forget_points": 60, "largest_forget_class": 2}


def test_umap_needs_a_forget_set():
    from sharp_unlearn.errors import ConfigError
    from sharp_unlearn.metrics.base import check_requirements

    ds = IndexedTensorDataset(torch.randn(10, 6), torch.zeros(10, dtype=torch.long))
    ctx = EvalContext(MLP(num_classes=2, input_shape=(6,)), {"train": ds, "test": ds})
    with pytest.raises(ConfigError, match="needs the split\\(s\\) retain, forget.*forget.kind=random"):
        check_requirements(METRICS.get("umap"), ctx)
