"""SAELens reads univ's SAE checkpoints: ``SAE.load_from_disk`` on a ``univ train-sae`` folder gives an SAE
that encodes and decodes as univ's does. Needs the optional extra (``pip install 'univ[saelens]'``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae.api import train_sae_on_npy
from sae.checkpoint import load_sae

sae_lens = pytest.importorskip("sae_lens")


@pytest.mark.parametrize("arch, expected", [("relu", "standard"), ("topk", "topk")])
def test_saelens_loads_a_train_sae_checkpoint_and_matches_univ(tmp_path, arch, expected):
    rng = np.random.default_rng(0)
    acts = np.maximum(rng.standard_normal((4096, 8)) @ rng.standard_normal((8, 16)), 0).astype(np.float32)
    np.save(tmp_path / "acts.npy", acts)
    train_sae_on_npy(tmp_path / "acts.npy", tmp_path / "sae", {"arch": arch, "dict_size": 64, "k": 4, "samples": 4096,
                                                                "batch_size": 256}, progress=False, device="cpu")
    ours = load_sae(tmp_path / "sae")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    assert theirs.cfg.architecture() == expected and theirs.cfg.d_sae == 64 and theirs.cfg.d_in == 16
    x = torch.from_numpy(acts[:512]) * 1.5  # not only the training inputs: the input scale must be folded in
    with torch.no_grad():
        f_ours, f_theirs = ours.encode(x), theirs.encode(x)
        torch.testing.assert_close(f_theirs, f_ours, atol=1e-5, rtol=1e-5)
        assert (f_ours > 0).sum(dim=1).float().mean() > 0  # a test on an all-zero code would prove nothing
        torch.testing.assert_close(theirs.decode(f_ours), ours.decode(f_ours), atol=1e-5, rtol=1e-5)
