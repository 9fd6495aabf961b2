"""volo_jax.platforms.cpu: the CPU's product rules (float32 unchanged; low precision
accumulated in float32, forward and backward), and the layers built for the CPU, which
carry them through flax's injection points."""

from __future__ import annotations

import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from tests.support import programs
from volo_jax import layers
from volo_jax.ops.attention import Attention
from volo_jax.platforms import cpu

SPECS = [
    "bhqd,bhkd->bhqk",  # attention logits (contract the minor dims)
    "bhqk,bhkd->bhqd",  # attention output
    "bnc,co->bno",  # a Dense layer
    "bnc,bno->co",  # its weight gradient (sums over the tokens)
    "...qd,...kd->...qk",
    "bxynij,bxynjd->bxynid",  # outlook attention's product (slices)
]


SIZES = dict(zip("bhqkdncoxyij", (2, 3, 5, 4, 6, 7, 8, 9, 2, 3, 4, 4), strict=True))
# Long contractions (256 terms, 128 for 'bn'), where a bfloat16 accumulator would be many
# bf16 ulps off the float32 sum.
LONG = SIZES | {"d": 256, "k": 256, "c": 256, "n": 64, "j": 256}


def _operands(spec: str, seed: int = 0, sizes: dict = SIZES) -> tuple[jax.Array, jax.Array]:
    sa, sb = spec.split("->")[0].replace("...", "bh").split(",")
    ka, kb = jax.random.split(jax.random.PRNGKey(seed))
    return (
        jax.random.normal(ka, [sizes[c] for c in sa]),
        jax.random.normal(kb, [sizes[c] for c in sb]),
    )


@pytest.mark.parametrize("spec", SPECS)
def test_float32_is_jnp_einsum(spec):
    a, b = _operands(spec)
    chex.assert_trees_all_equal(cpu.einsum(spec, a, b), jnp.einsum(spec, a, b))


def _bf16_ulps(got: jax.Array, want: jax.Array) -> float:
    """The largest |got - want| in bfloat16 ulps of |want| (want: bf16 values), an ulp
    being at least that of 2**-16 max|want| (float32 sums of different order differ by
    that much where terms cancel)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    magnitude = np.maximum(np.abs(want), 2.0**-16 * np.abs(want).max())
    return float(np.max(np.abs(got - want) / np.exp2(np.floor(np.log2(magnitude)) - 7)))


@pytest.mark.parametrize("spec", SPECS)
def test_bfloat16_products_and_gradients_accumulate_in_float32(spec):
    """bf16 operands: the product, and each gradient, is the float32 product of the bf16
    values rounded once to bf16 (within 1 bf16 ulp: XLA's float32 summation order may
    land on the other side of a rounding boundary)."""
    a, b = _operands(spec, sizes=LONG)
    a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    out = cpu.einsum(spec, a16, b16)
    assert out.dtype == jnp.bfloat16
    f32 = lambda x: x.astype(jnp.float32)
    exact, vjp = jax.vjp(
        lambda x, y: jnp.einsum(spec, x, y, precision="highest"), f32(a16), f32(b16)
    )
    assert _bf16_ulps(out, exact.astype(jnp.bfloat16)) <= 1

    # d/d out of sum(out.astype(f32) ** 2) is 2 * out, exact in bf16.
    grads = jax.grad(lambda x, y: jnp.sum(f32(cpu.einsum(spec, x, y)) ** 2), (0, 1))(a16, b16)
    for g, r in zip(grads, vjp(2 * f32(out)), strict=True):
        assert g.dtype == jnp.bfloat16
        assert _bf16_ulps(g, r.astype(jnp.bfloat16)) <= 1


def test_no_bfloat16_output_products_on_the_cpu():
    """Forward and backward of a bf16 Dense layer compile to float32-output dots (the
    CPU's matrix-unit path), never a bf16-output dot."""
    if jax.default_backend() != "cpu":
        pytest.skip("the rule applies on the CPU")
    layer = nn.Dense(16, dtype=jnp.bfloat16, dot_general=cpu.dot_general)
    x = jnp.ones((2, 8, 12))
    params = nn.unbox(layer.init(jax.random.PRNGKey(0), x))

    def loss(p, x):
        return jnp.sum(layer.apply(p, x).astype(jnp.float32))

    hlo = jax.jit(jax.grad(loss, (0, 1))).lower(params, x).as_text(dialect="hlo")
    dots = re.findall(r"= (\w+)\[[^\]]*\][^ ]* dot\(", hlo)
    assert dots and set(dots) == {"f32"}, dots


def _compiled_dot_operand_dtypes(compiled_hlo: str) -> list[tuple[str, ...]]:
    """The operand dtypes of every dot in an optimized HLO module (after XLA's passes,
    which may have rewritten the operands), e.g. [('bf16', 'bf16'), ...]."""
    out = []
    for computation in re.split(r"\n(?=%|ENTRY)", compiled_hlo):
        types = dict(re.findall(r"(\w[\w.-]*): (\w+)\[", computation.split("\n", 1)[0]))
        types |= dict(re.findall(r"%([\w.-]+) = (\w+)\[", computation))
        for operands in re.findall(r" dot\(%([\w.-]+), %([\w.-]+)\)", computation):
            out.append(tuple(types.get(name, "?") for name in operands))
    return out


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_low_precision_products_stay_low_precision_after_compilation(dtype):
    """Every product of an attention layer's forward and backward (its Dense layers and
    its weights) reaches the
    CPU's matrix unit with bf16 operands: XLA folds a transposed operand into a dot's
    dimension numbers and then upcasts that dot to float32, which `_product_f32` must
    prevent (bf16 layers, and float32 layers under matmul precision 'bfloat16')."""
    if jax.default_backend() != "cpu":
        pytest.skip("the rule applies on the CPU")
    layer = Attention(192, 6, dtype=dtype, platform="cpu")
    x = jnp.ones((8, 196, 192))
    params = nn.unbox(layer.init(jax.random.PRNGKey(0), x))

    def forward(p, x):
        return layer.apply(p, x)

    def loss(p, x):
        return jnp.sum(forward(p, x).astype(jnp.float32))

    with jax.default_matmul_precision("bfloat16"):
        compiled = jax.jit(jax.grad(loss, (0, 1))).lower(params, x).compile().as_text()
    dtypes = _compiled_dot_operand_dtypes(compiled)
    assert dtypes and set(dtypes) == {("bf16", "bf16")}, dtypes


def test_dot_general_matches_lax():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 5))
    w = jax.random.normal(jax.random.PRNGKey(2), (5, 9))
    y = jax.random.normal(jax.random.PRNGKey(3), (2, 9, 5))
    for rhs, dims in [
        (w, (((2,), (0,)), ((), ()))),
        (y, (((2,), (2,)), ((0,), (0,)))),
    ]:
        ref = lax.dot_general(x, rhs, dims)
        chex.assert_trees_all_equal(cpu.dot_general(x, rhs, dims), ref)
        low = cpu.dot_general(x.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), dims)
        assert low.dtype == jnp.bfloat16 and low.shape == ref.shape
        np.testing.assert_allclose(np.asarray(low, np.float32), ref, rtol=3e-2, atol=3e-2)


def test_conv_low_precision_runs_in_float32():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 4))
    k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 8))
    args = ((1, 1), ((1, 1), (1, 1)))
    dn = lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
    ref = lax.conv_general_dilated(x, k, *args, dimension_numbers=dn)
    chex.assert_trees_all_equal(cpu.conv_general_dilated(x, k, *args, dimension_numbers=dn), ref)
    x16, k16 = x.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    low = cpu.conv_general_dilated(x16, k16, *args, dimension_numbers=dn)
    assert low.dtype == jnp.bfloat16
    exact = lax.conv_general_dilated(
        x16.astype(jnp.float32), k16.astype(jnp.float32), *args, dimension_numbers=dn
    )
    np.testing.assert_allclose(np.asarray(low, np.float32), exact, rtol=1e-2, atol=1e-2)


def _conv_shapes(fn, *args) -> list[tuple[int, ...]]:
    """The output shapes of the convolutions in the traced program of `fn`: what our code
    asks XLA for (before XLA's passes, which merge duplicates)."""
    return [
        tuple(eqn.outvars[0].aval.shape)
        for eqn in programs.equations(fn, *args)
        if eqn.primitive.name == "conv_general_dilated"
    ]


@pytest.mark.parametrize(
    "shape, kernel, strides, padding",
    [
        ((2, 32, 40, 4), (3, 3), (1, 1), ((1, 1), (1, 1))),  # VOLO's stem, chunks of 8 rows
        ((2, 10, 7, 3), (3, 3), (1, 1), "SAME"),  # one chunk per image
        ((1, 9, 8, 5), (2, 3), (1, 1), "VALID"),
        ((2, 6, 6, 2), (3, 2), (1, 1), ((0, 2), (1, 0))),  # uneven padding
        ((1, 8, 8, 3), (7, 7), (1, 1), ((3, 3), (3, 3))),
        ((2, 16, 16, 3), (7, 7), (2, 2), ((3, 3), (3, 3))),  # VOLO's first convolution
        ((1, 9, 11, 4), (3, 3), (2, 2), "SAME"),  # odd sizes, XLA's asymmetric padding
        ((1, 10, 9, 2), (3, 2), (3, 2), ((1, 0), (0, 1))),  # uneven strides
    ],
)
def test_conv_weight_gradient_equals_lax(shape, kernel, strides, padding):
    """A convolution with a kernel larger than 1 x 1 on the CPU gets its weight gradient
    from stacked shifted products (no third convolution in the gradient's program),
    equal to XLA's within float32 rounding; forward and input gradient are XLA's."""
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    k = jax.random.normal(jax.random.PRNGKey(1), (*kernel, shape[-1], 6))
    dn = lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
    t = jax.random.normal(
        jax.random.PRNGKey(2),
        lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=dn).shape,
    )

    def loss(conv, x, k):
        return jnp.sum(conv(x, k, strides, padding, dimension_numbers=dn) * t)

    def grad(conv):
        return jax.grad(functools.partial(loss, conv), (0, 1))

    ref = grad(lax.conv_general_dilated)(x, k)
    for g, r in zip(jax.jit(grad(cpu.conv_general_dilated))(x, k), ref, strict=True):
        scale = float(jnp.abs(r).max())
        np.testing.assert_allclose(g, r, rtol=0, atol=2e-6 * scale * np.sqrt(np.prod(shape[:3])))
    # The forward and the input gradient are convolutions, the weight gradient (the one
    # convolution with the kernel's shape in XLA's own gradient) is not.
    ours, xla = (
        _conv_shapes(grad(c), x, k) for c in (cpu.conv_general_dilated, lax.conv_general_dilated)
    )
    assert ours and k.shape not in ours, ours
    assert k.shape in xla, xla


def test_conv_weight_gradient_follows_the_matmul_precision():
    """Under matmul precision 'bfloat16' the weight gradient's product takes bf16 operands
    (the forward and input-gradient convolutions stay float32)."""
    if jax.default_backend() != "cpu":
        pytest.skip("the rule applies on the CPU")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 12, 8))
    k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 8, 6))
    dn = lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))

    def loss(conv, k):
        return jnp.sum(conv(x, k, (1, 1), "SAME", dimension_numbers=dn) ** 2)

    grad = jax.grad(functools.partial(loss, cpu.conv_general_dilated))
    with jax.default_matmul_precision("bfloat16"):
        dk = jax.jit(grad)(k)
        dtypes = _compiled_dot_operand_dtypes(jax.jit(grad).lower(k).compile().as_text())
    assert dtypes and set(dtypes) == {("bf16", "bf16")}, dtypes
    ref = jax.grad(functools.partial(loss, lax.conv_general_dilated))(k)
    assert dk.dtype == jnp.float32
    assert not np.array_equal(dk, ref)  # the operands were rounded
    np.testing.assert_allclose(dk, ref, rtol=0, atol=2e-2 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize(
    "shape, kernel, padding",
    [
        ((2, 16, 16, 8), (4, 4), "VALID"),  # VOLO's stem projection
        ((2, 6, 6, 12), (2, 2), ((0, 0), (0, 0))),  # VOLO's Downsample
        ((1, 9, 11, 3), (2, 3), "VALID"),  # a remainder XLA drops too
        ((2, 5, 5, 4), (1, 1), "SAME"),  # a 1 x 1 convolution is a Dense layer
    ],
)
def test_patch_conv_equals_lax(shape, kernel, padding):
    """A convolution whose stride equals its kernel is products over patch rows on the
    CPU (no convolution left in its program), equal to XLA's convolution in float32,
    forward and gradients; bf16 operands under matmul precision 'bfloat16'."""
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    k = jax.random.normal(jax.random.PRNGKey(1), (*kernel, shape[-1], 5))
    dn = lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
    ref_out = lax.conv_general_dilated(x, k, kernel, padding, dimension_numbers=dn)
    t = jax.random.normal(jax.random.PRNGKey(2), ref_out.shape)

    def loss(conv, x, k):
        return jnp.sum(conv(x, k, kernel, padding, dimension_numbers=dn) * t)

    out = cpu.conv_general_dilated(x, k, kernel, padding, dimension_numbers=dn)
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-5 * float(jnp.abs(ref_out).max()))
    grad = jax.grad(functools.partial(loss, cpu.conv_general_dilated), (0, 1))
    ref = jax.grad(functools.partial(loss, lax.conv_general_dilated), (0, 1))(x, k)
    for g, r in zip(jax.jit(grad)(x, k), ref, strict=True):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-5 * float(jnp.abs(r).max()))
    assert _conv_shapes(grad, x, k) == []
    if jax.default_backend() != "cpu":
        return
    with jax.default_matmul_precision("bfloat16"):
        low = jax.jit(grad)(x, k)
        dtypes = _compiled_dot_operand_dtypes(jax.jit(grad).lower(x, k).compile().as_text())
    assert dtypes and set(dtypes) == {("bf16", "bf16")}, dtypes
    for g, r in zip(low, ref, strict=True):
        assert g.dtype == jnp.float32 and not np.array_equal(g, r)
        np.testing.assert_allclose(g, r, rtol=0, atol=3e-2 * float(jnp.abs(r).max()))


@pytest.mark.parametrize(
    "spec, message",
    [("ij,jk", "explicit '->'"), ("ij,jk->k", "summed within one operand")],
)
def test_bad_spec(spec, message):
    a = jnp.ones((2, 3), jnp.bfloat16)
    b = jnp.ones((3, 4), jnp.bfloat16)
    if jax.default_backend() != "cpu":
        pytest.skip("low-precision specs are rewritten on the CPU only")
    with pytest.raises(ValueError, match=message):
        cpu.einsum(spec, a, b)


@pytest.mark.parametrize("spec", ["bnc,co->bno", "bhqd,bhkd->bhqk"])
def test_float32_under_bfloat16_matmul_precision(spec):
    """float32 operands, jax_default_matmul_precision='bfloat16': on the CPU the operands
    are rounded to bf16, the product accumulates and stays float32 (forward and grads)."""
    if jax.default_backend() != "cpu":
        pytest.skip("the rule applies on the CPU")
    a, b = _operands(spec)
    rounded = [x.astype(jnp.bfloat16).astype(jnp.float32) for x in (a, b)]
    with jax.default_matmul_precision("bfloat16"):
        out = cpu.einsum(spec, a, b)
        grads = jax.grad(lambda x, y: jnp.sum(cpu.einsum(spec, x, y) ** 2), (0, 1))(a, b)
        hlo = jax.jit(lambda x, y: cpu.einsum(spec, x, y)).lower(a, b).as_text("hlo")
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, jnp.einsum(spec, *rounded), rtol=1e-5, atol=1e-5)
    assert not np.array_equal(out, jnp.einsum(spec, a, b))  # the operands were rounded
    dots = re.findall(r"= (\w+)\[[^\]]*\][^ ]* dot\(", hlo)
    assert dots and set(dots) == {"f32"} and "bf16[" in hlo  # bf16 operands, f32 result
    ref = jax.grad(lambda x, y: jnp.sum(jnp.einsum(spec, x, y) ** 2), (0, 1))(a, b)
    for g, r in zip(grads, ref, strict=True):
        assert g.dtype == jnp.float32
        assert float(jnp.abs(g - r).max()) <= 2e-2 * float(jnp.abs(r).max())
    # Without the setting, float32 products are untouched.
    chex.assert_trees_all_equal(cpu.einsum(spec, a, b), jnp.einsum(spec, a, b))


@pytest.mark.parametrize("spec", ["bnc,co->bno", "bhqd,bhkd->bhqk"])
def test_float32_gradients_are_not_rounded_to_bfloat16(spec):
    """Under a bf16 matmul precision a float32 operand's gradient is the float32 product
    of the bf16-rounded cotangent and other operand: rounded operands, never a rounded
    result (rounding it to bf16 would be off by up to 2**-9 relative)."""
    if jax.default_backend() != "cpu":
        pytest.skip("the rule applies on the CPU")
    a, b = _operands(spec, seed=3)
    g = jax.random.normal(jax.random.PRNGKey(7), jnp.einsum(spec, a, b).shape)

    def rounded(x):
        return x.astype(jnp.bfloat16).astype(jnp.float32)

    with jax.default_matmul_precision("bfloat16"):
        _, vjp = jax.vjp(lambda x, y: cpu.einsum(spec, x, y), a, b)
        da, db = vjp(g)
    inputs, out = spec.split("->")
    sa, sb = inputs.split(",")
    hi = lax.Precision.HIGHEST
    want_a = jnp.einsum(f"{out},{sb}->{sa}", rounded(g), rounded(b), precision=hi)
    want_b = jnp.einsum(f"{sa},{out}->{sb}", rounded(a), rounded(g), precision=hi)
    for got, want in ((da, want_a), (db, want_b)):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("platform", ["cpu", "tpu", None])
def test_a_layer_carries_the_cpu_rules_only_when_built_for_the_cpu(platform):
    """`layers.dense` and `layers.conv2d` built for a platform trace one program, with
    no choice among platforms left in it, and the CPU's rules (their name scope) only
    when that platform is the CPU."""
    x = jnp.ones((2, 8, 8, 4))
    model = nn.Sequential(
        [
            layers.conv2d(8, 3, dtype=jnp.bfloat16, platform=platform),
            layers.dense(8, ("embed", "mlp"), dtype=jnp.bfloat16, platform=platform),
        ]
    )
    params = nn.unbox(model.init(jax.random.PRNGKey(0), x))
    jaxpr = str(jax.jit(model.apply).trace(params, x).jaxpr)
    assert "platform_index" not in jaxpr
    text = jax.export.export(jax.jit(model.apply), platforms=[platform or "tpu"])(
        params, x
    ).mlir_module()
    assert (f"/{cpu.SCOPE}/" in text) == (platform == "cpu")
