"""Tests for hpcsgd.train.models: shapes, parameter counts, determinism, errors, gradient flow."""

import pytest
import torch
import torch.nn.functional as F

from hpcsgd.errors import ConfigError
from hpcsgd.train.models import (
    MODEL_NAMES,
    build_model,
    count_parameters,
    mlp_hidden_for_params,
    mlp_param_count,
)

SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar": (3, 32, 32)}

# Exact counts for the CIFAR ResNets with option-A shortcuts, 3 input channels, 10 classes.
RESNET_PARAMS = {"resnet20": 269_722, "resnet56": 853_018, "resnet110": 1_727_962}
PAPER_PARAMS = {"resnet20": 0.27e6, "resnet56": 0.85e6, "resnet110": 1.73e6}


def test_model_names():
    assert MODEL_NAMES == ("mlp", "lenet", "resnet20", "resnet56", "resnet110")


@pytest.mark.parametrize("shape_name", sorted(SHAPES))
@pytest.mark.parametrize("name", ["mlp", "lenet", "resnet20", "resnet56"])
def test_output_shape(name, shape_name):
    shape = SHAPES[shape_name]
    torch.manual_seed(0)
    model = build_model(name, shape, 10)
    x = torch.randn(4, *shape)
    out = model(x)
    assert out.shape == (4, 10)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape_name", sorted(SHAPES))
def test_resnet110_forward(shape_name):
    shape = SHAPES[shape_name]
    model = build_model("resnet110", shape, 7)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("shape", [(64,), (3, 5, 9), (2, 4, 4)])
def test_mlp_any_shape_and_small_images(shape):
    model = build_model("mlp", shape, 3, mlp_hidden=(16,))
    assert model(torch.randn(5, *shape)).shape == (5, 3)
    if len(shape) == 3:
        assert build_model("lenet", shape, 3)(torch.randn(5, *shape)).shape == (5, 3)
        assert build_model("resnet20", shape, 3)(torch.randn(5, *shape)).shape == (5, 3)


def test_mlp_structure_and_count():
    model = build_model("mlp", (1, 8, 8), 10, mlp_hidden=(32, 16))
    assert count_parameters(model) == 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
    assert count_parameters(model) == mlp_param_count(64, 10, (32, 16))
    linear = build_model("mlp", (20,), 4, mlp_hidden=())
    assert count_parameters(linear) == 20 * 4 + 4


@pytest.mark.parametrize("name", sorted(RESNET_PARAMS))
def test_resnet_param_counts(name):
    model = build_model(name, (3, 32, 32), 10)
    n = count_parameters(model)
    assert n == RESNET_PARAMS[name]
    assert abs(n - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.03


def test_resnet_option_a_shortcuts_parameter_free():
    model = build_model("resnet20", (3, 32, 32), 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 19  # 1 stem + 3 stages * 3 blocks * 2 convs, none in shortcuts
    assert all(m.kernel_size == (3, 3) for m in convs)


@pytest.mark.parametrize("name", MODEL_NAMES[:3])
def test_deterministic_init(name):
    torch.manual_seed(123)
    a = build_model(name, (3, 32, 32), 10).state_dict()
    torch.manual_seed(123)
    b = build_model(name, (3, 32, 32), 10).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    torch.manual_seed(124)
    c = build_model(name, (3, 32, 32), 10).state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("name", MODEL_NAMES[:3])
def test_all_float32(name):
    model = build_model(name, (1, 8, 8), 10)
    for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
        assert t.dtype == torch.float32


def test_float32_even_with_float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = build_model("lenet", (1, 8, 8), 10)
    finally:
        torch.set_default_dtype(old)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_unknown_name():
    with pytest.raises(ConfigError, match="resnet110"):
        build_model("vgg16", (3, 32, 32), 10)
    with pytest.raises(ConfigError):
        build_model(None, (3, 32, 32), 10)


@pytest.mark.parametrize(
    "name,shape",
    [
        ("lenet", (64,)),
        ("lenet", (1, 3, 8)),
        ("lenet", (8, 8)),
        ("resnet20", (3072,)),
        ("resnet56", (1, 8)),
        ("mlp", ()),
        ("mlp", (0, 8, 8)),
        ("mlp", (1, -8, 8)),
        ("mlp", "1x8x8"),
    ],
)
def test_bad_shapes(name, shape):
    with pytest.raises(ConfigError, match="input_shape"):
        build_model(name, shape, 10)


def test_bad_num_classes_and_hidden():
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("mlp", (4,), 0)
    with pytest.raises(ConfigError, match="mlp_hidden"):
        build_model("mlp", (4,), 2, mlp_hidden=(8, 0))


def test_mlp_hidden_for_params():
    hidden = mlp_hidden_for_params(3072, 10, 5_800_000)
    assert len(hidden) == 2 and hidden[0] == hidden[1]
    model = build_model("mlp", (3, 32, 32), 10, mlp_hidden=hidden)
    n = count_parameters(model)
    assert abs(n - 5_800_000) / 5_800_000 < 0.02
    for layers in (1, 3):
        h = mlp_hidden_for_params(3072, 10, 5_800_000, layers=layers)
        assert len(h) == layers
        assert abs(mlp_param_count(3072, 10, h) - 5_800_000) / 5_800_000 < 0.02


def test_mlp_hidden_for_params_errors():
    with pytest.raises(ConfigError, match="target_params"):
        mlp_hidden_for_params(3072, 10, 10)
    with pytest.raises(ConfigError, match="layers"):
        mlp_hidden_for_params(3072, 10, 5_800_000, layers=0)


@pytest.mark.parametrize("name", ["mlp", "lenet"])
def test_sgd_step_reduces_loss(name):
    torch.manual_seed(0)
    model = build_model(name, (1, 8, 8), 10)
    x = torch.randn(16, 1, 8, 8)
    y = torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss0 = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss0.backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()
    with torch.no_grad():
        loss1 = F.cross_entropy(model(x), y)
    assert loss1.item() < loss0.item()
