"""CIFAR model zoo: mdistiller state_dict compatibility, forward contract, staged view."""

import json
import os

import pytest
import torch

from mdistiller_blockkd.errors import ConfigError
from mdistiller_blockkd.models import build_model, count_params, list_models, model_dict

MANIFEST = json.load(open(os.path.join(os.path.dirname(__file__), "fixtures", "cifar_models_mdistiller.json")))
NAMES = sorted(MANIFEST)


def test_every_contract_model_is_registered():
    assert set(NAMES) <= set(list_models())


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_matches_mdistiller(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=100)
    want = MANIFEST[name]
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert sorted(got) == sorted((k, list(s)) for k, s in want["state_dict"])
    assert count_params(model) == want["params"]
    # an upstream checkpoint (same keys and shapes) loads strictly
    fake = {k: torch.zeros(s) if s else torch.tensor(0) for k, s in want["state_dict"]}
    model.load_state_dict(fake, strict=True)


@pytest.mark.parametrize("name", NAMES)
def test_forward_contract_and_staged_view(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=100).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, feats = model(x)
        assert logits.shape == (2, 100)
        want = MANIFEST[name]
        assert [list(f.shape[1:]) for f in feats["feats"]] == want["feats"]
        assert [list(f.shape[1:]) for f in feats["preact_feats"]] == want["feats"]
        assert list(feats["pooled_feat"].shape[1:]) == want["pooled_feat"]
        view = model.staged_view()
        assert view.num_blocks == len(want["feats"]) - 1
        torch.testing.assert_close(view(x), logits, rtol=1e-5, atol=1e-5)
        # feature_info describes the real outputs
        outs = view.block_outputs(x)
        for info, f in zip(view.block_info, outs):
            assert info.num_chs == f.shape[1]
            assert info.reduction == 32 // f.shape[2]
        assert view.stem_info.num_chs == feats["feats"][0].shape[1]
        # splicing at any depth reproduces the logits
        for start, h in enumerate([view.stem(x)] + outs[:-1]):
            torch.testing.assert_close(view.forward_from(h, start), logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), logits, rtol=1e-5, atol=1e-5)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ConfigError, match="resnet57"):
        build_model("resnet57")


def test_registry_has_teacher_paths():
    assert model_dict["resnet56"][1].endswith(os.path.join("resnet56_vanilla", "ckpt_epoch_240.pth"))
