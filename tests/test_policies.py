"""The policy transform: block linears reproduce both backends, training and stripping work."""

import cuequivariance as cue
import cuequivariance_torch as cuet
import pytest
import torch
from e3nn import o3
from mace.tools.cg import O3_e3nn

from tiny_models import build_tiny_model
from mace_lpcalc.precision.backends import check_single_backend, model_backend
from mace_lpcalc.precision.casting import IrrepBlockLinear
from mace_lpcalc.precision.policies import apply_policy, get_policy, strip_policy

IRREPS = [("8x0e + 8x0e + 8x1o + 4x1o + 8x2e", "6x0e + 5x1o + 3x2e"),  # several sources
          ("4x0e + 4x1o", "4x0e + 4x1o + 2x2e")]                       # an unreachable output


def cueq_linear(irreps_in, irreps_out):
    return cuet.Linear(cue.Irreps(O3_e3nn, irreps_in), cue.Irreps(O3_e3nn, irreps_out),
                       layout=cue.ir_mul, shared_weights=True, method="naive", dtype=torch.float64)


@pytest.mark.parametrize("irreps_in, irreps_out", IRREPS)
@pytest.mark.parametrize("library", ["e3nn", "cuequivariance"])
def test_block_linear_reproduces_the_layer_exactly(library, irreps_in, irreps_out):
    torch.manual_seed(0)
    linear = (o3.Linear(irreps_in, irreps_out).double() if library == "e3nn"
              else cueq_linear(irreps_in, irreps_out))
    with torch.no_grad():
        linear.weight.normal_()
    blocks = IrrepBlockLinear(linear, torch.float64)
    assert blocks.layout == ("mul_ir" if library == "e3nn" else "ir_mul")
    x = torch.randn(7, o3.Irreps(irreps_in).dim, dtype=torch.float64)
    torch.testing.assert_close(blocks(x), linear(x), rtol=1e-12, atol=1e-12)


def test_16bit_blocks_round_like_16bit_operands():
    torch.manual_seed(1)
    linear = o3.Linear("16x0e + 16x1o", "16x0e + 16x1o").double()
    x = torch.randn(50, linear.irreps_in.dim, dtype=torch.float64)
    exact = linear(x)
    for dtype, unit_roundoff in ((torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)):
        error = (IrrepBlockLinear(linear, dtype)(x) - exact).norm() / exact.norm()
        # Both operands rounded once (relative u each) plus the output rounded once.
        assert unit_roundoff / 10 < error < 3 * unit_roundoff


def test_unknown_layout_is_refused():
    class Scrambled(torch.nn.Module):
        """A 'linear' whose output mixes irrep components: not an equivariant block map."""

        def __init__(self):
            super().__init__()
            self.irreps_in = o3.Irreps("2x1o")
            self.irreps_out = o3.Irreps("2x1o")
            self.weight = torch.nn.Parameter(torch.randn(36, dtype=torch.float64))

        def forward(self, x):
            return x @ self.weight.view(6, 6)

    with pytest.raises(ValueError, match="refusing to guess its layout"):
        IrrepBlockLinear(Scrambled(), torch.bfloat16)


def test_training_reaches_fp32_master_weights_and_strip_restores(water_batch):
    model = build_tiny_model(dtype=torch.float32)
    before = model(dict(water_batch()), training=True)["energy"].detach()
    original_types = {name: type(m) for name, m in model.named_modules()}
    apply_policy(model, "fp32-linear-bf16")
    assert isinstance(model.interactions[0].linear_up, IrrepBlockLinear)
    energy = model(dict(water_batch()), training=True)["energy"].sum()
    energy.backward()
    master = model.interactions[0].linear_up.linear.weight
    assert master.dtype == torch.float32 and master.grad is not None
    assert master.grad.abs().sum() > 0
    strip_policy(model)
    assert {name: type(m) for name, m in model.named_modules()} == original_types
    after = model(dict(water_batch()), training=True)["energy"].detach()
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_cached_16bit_weights_follow_in_place_updates():
    linear = o3.Linear("4x0e", "4x0e")
    linear.weight.requires_grad_(False)
    blocks = IrrepBlockLinear(linear, torch.bfloat16)
    x = torch.randn(3, 4)
    first = blocks(x)
    with torch.no_grad():
        linear.weight.mul_(2)
    torch.testing.assert_close(blocks(x), 2 * first, rtol=1e-2, atol=1e-3)


def test_mixed_backends_are_refused_and_would_permute_features():
    """The thesis's Fig. 4.15: an e3nn Linear fed cuEquivariance (ir_mul) features."""
    torch.manual_seed(2)
    irreps = "8x0e + 8x1o + 8x2e"
    cueq = cueq_linear(irreps, irreps)
    e3nn = o3.Linear(irreps, irreps).double()
    with torch.no_grad():
        cueq.weight.normal_()
        e3nn.weight.copy_(cueq.weight.reshape(-1))  # same weights, same flat order
    x_ir_mul = torch.randn(20, o3.Irreps(irreps).dim, dtype=torch.float64)
    expected = cueq(x_ir_mul)
    relative_l2 = (e3nn(x_ir_mul) - expected).norm() / expected.norm()
    assert relative_l2 > 0.3  # a silent, O(1) error
    torch.testing.assert_close(IrrepBlockLinear(cueq, torch.float64)(x_ir_mul), expected)

    from mace.cli.convert_e3nn_cueq import run as convert
    saved = torch.get_default_dtype()
    model = convert(build_tiny_model(), device="cpu")
    torch.set_default_dtype(saved)
    assert model_backend(model) == "cuequivariance"
    model.readouts[0].linear = o3.Linear("8x0e + 8x1o", "1x0e").double()
    with pytest.raises(ValueError, match="mixes e3nn and cuEquivariance"):
        check_single_backend(model)


def test_policy_names_and_details():
    policy = get_policy("fp32-linear-fp16")
    assert policy.as_dict()["linear_dtype"] == "float16"
    assert policy.model_dtype_name == "float32"
    with pytest.raises(ValueError, match="valid policies: fp64, fp32"):
        get_policy("fp8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused convolution is CUDA-only")
def test_fused_convolution_takes_16bit_radial_weights_with_unchanged_results(water8):
    """Handing the kernel the radial MLP's bf16 product equals casting it to fp32 first."""
    from ase.calculators.calculator import all_changes

    from mace_lpcalc.calculator import LowPrecisionMACECalculator
    from mace_lpcalc.precision.backends import unfeed_16bit_radial_weights

    calc = LowPrecisionMACECalculator(models=build_tiny_model(dtype=torch.float32),
                                      device="cuda", policy="fp32-linear-bf16",
                                      backend="cuequivariance", fast_path=False)
    report = {row["module"]: row for row in calc.precision_report(water8)}
    assert report["interactions.0.conv_tp"]["input_dtypes"] == ["bfloat16", "float32"]
    assert report["interactions.0.conv_tp"]["output_dtypes"] == ["float32"]
    calc.calculate(water8, ["energy", "forces"], all_changes)
    fed = calc.results["energy"], calc.results["forces"].copy()
    unfeed_16bit_radial_weights(calc.models[0])
    calc.calculate(water8, ["energy", "forces"], all_changes)
    cast = calc.results["energy"], calc.results["forces"]
    assert abs(fed[0] - cast[0]) < 1e-6 * len(water8)
    # Only the order of fp32 atomic additions differs (bf16 rounding moves forces ~1e-2).
    assert abs(fed[1] - cast[1]).max() < 1e-5 * abs(cast[1]).max()
