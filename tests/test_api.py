"""composer.api: the documented Python entry points, used as its docstring shows."""
import pytest
import torch
from PIL import Image

from composer import api
from tests.helpers import SPECS


def test_the_documented_flow(tmp_path):
    spec = api.load_spec(SPECS / "quickstart.yaml", ["train.epochs=1", "train.max_steps_per_epoch=4",
                                                      f"train.out_dir={tmp_path / 'run'}"])
    model = api.build_model(spec)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    assert [layer.name for layer in model.layers][:2] == ["stem", "rearrange"]
    result = api.train(spec, echo=lambda *a, **k: None)
    assert result["run_dir"] == str(tmp_path / "run") and result["final"]["epoch"] == 1
    loaded_spec, trained, checkpoint = api.load_run(result["run_dir"])
    assert loaded_spec.name == "quickstart" and not trained.training and checkpoint["epoch"] == 1
    image = tmp_path / "digit.png"
    Image.fromarray((torch.rand(16, 16) * 255).byte().numpy()).save(image)
    predicted = api.predict(result["run_dir"], [str(image)], top=3)
    assert [len(row["top"]) for row in predicted["predictions"]] == [3]
    assert api.summarize(spec)["params"] == sum(p.numel() for p in model.parameters())


def test_mistakes_raise_the_commands_messages():
    with pytest.raises(api.SpecError) as info:
        api.load_spec_text("model: {image_size: 16}\n", "x.yaml")
    assert isinstance(info.value, api.UserError) and "model.num_classes: required field is missing" in str(info.value)
    with pytest.raises(api.UserError, match="does not exist"):
        api.load_run("/nowhere")


def test_everything_listed_is_there():
    assert all(getattr(api, name) is not None for name in api.__all__)
