"""The phased fused kernel (kernels/phased.py) under the Triton interpreter, against the plain step loop.

In the interpreter the kernel runs as one program that takes every tile of every phase, so these tests
check its arithmetic: the tiles of rows, modes, columns and hidden units (ragged ones included), the
LayerNorm statistics merged from column tiles, the state, event dt and every discretisation. Its
waits between programs (the row blocks' counters) are exercised on the GPU (tests/test_fused_phased_cuda.py).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lrnn_lightning.rollout.fused import KernelConfig, fused_rollout, fused_steps, launch, support
from lrnn_lightning.rollout.fused.config import phased_config
from lrnn_lightning.rollout.fused.launch import build_call, default_launch
from lrnn_lightning.rollout.fused.pack import pack_model
from lrnn_lightning.rollout.fused.phased_launch import check_offsets, phase_tiles, phased_blocks
from lrnn_lightning.rollout.inference import rollout_mode
from lrnn_lightning.rollout.loop import run_steps
from tests.conftest import relative_error
from tests.helpers import import_interpreted
from tests.test_fused import (
    BF16_TOL,
    FUSED_TOL,
    HORIZON,
    case_id,
    loop_rollout,
    make_data,
    make_model,
    take_an_optimizer_step,
)

# 16-wide tiles over d_model 40 (three column tiles, the last ragged), the LRU's 20 modes (two blocks of 16; S5's
# 10 conjugate-symmetric modes: one, ragged) and 80 hidden units (blocks of 32, the last ragged); 20 rows: two
# row tiles of 16, the second padded
PHASED = KernelConfig(block_b=16, block_n=16, block_k=16, activations="phased")
MODAL_CASES = [("lru", {}), ("s5", {"discretization": "zoh"}), ("s5", {"discretization": "bilinear"}),
               ("s5", {"discretization": "dirac"}), ("s5", {"conj_sym": False})]


@pytest.fixture(scope="module")
def interpreter():
    return import_interpreted(support.KERNEL_MODULE)


def wide_model(case, n_layers: int = 2, seed: int = 0):
    return make_model(*case, d_model=40, d_state=20, n_layers=n_layers, seed=seed)


@pytest.mark.parametrize("event", [False, True], ids=["no-dt", "event-dt"])
@pytest.mark.parametrize("case", MODAL_CASES, ids=case_id)
def test_phased_rollout_equals_the_loop(interpreter, case, event):
    model = wide_model(case)
    context, dt = make_data(batch=20, event=event)
    out = fused_rollout(model, context, HORIZON, dt, config=PHASED)
    ref = loop_rollout(model, context, HORIZON, dt)
    assert out.shape == ref.shape
    assert relative_error(out[:, 1:], ref[:, 1:]) < FUSED_TOL
    assert relative_error(ref[:, -1], ref[:, 1]) > 1e-2  # the rollout moves


def test_phased_tiles_cover_the_model_in_several_blocks(interpreter):
    packed = pack_model(wide_model(MODAL_CASES[0]), torch.float32, event=False)
    blocks = phased_blocks(packed, PHASED)
    assert (blocks["BM"], blocks["BNC"], blocks["BPM"], blocks["BFU"], blocks["BK"]) == (16, 16, 16, 32, 16)
    # d_model 40 in 3 column tiles, 20 modes in 2 blocks, 80 hidden units in 3 (the last ragged)
    assert phase_tiles(packed, blocks, rows=32) == 2 * 3
    # each phase on its own row tiles. fp32 weights: 64 rows of d_model 512 in 64-row tiles, modes in blocks of 32
    # on 32-row tiles, decoding in 16; bf16 weights: modes in blocks of 64 on 16-row tiles, decoding in 32
    wide_model_512 = make_model("lru", d_model=512, d_state=256, n_layers=1)
    wide_config = KernelConfig(block_b=64, block_n=64, block_k=32, activations="phased")
    wide = pack_model(wide_model_512, torch.float32, event=False)
    wide_blocks = phased_blocks(wide, wide_config)
    assert (wide_blocks["BMM"], wide_blocks["BPM"], wide_blocks["BME"], wide_blocks["BFU"], wide_blocks["BKD"]) == (
        32, 32, 16, 128, 32)
    assert phase_tiles(wide, wide_blocks, rows=64) == max(1 * 1024 // 128, 2 * 256 // 32, 64 // 16) == 16
    wide = pack_model(wide_model_512, torch.bfloat16, event=False)
    wide_blocks = phased_blocks(wide, wide_config)
    assert (wide_blocks["BMM"], wide_blocks["BPM"], wide_blocks["BME"], wide_blocks["BFU"], wide_blocks["BKD"]) == (
        16, 64, 32, 128, 64)
    assert phase_tiles(wide, wide_blocks, rows=64) == max(1 * 1024 // 128, 4 * 256 // 64, 64 // 32) == 16
    call = build_call(packed, torch.randn(20, 3), None, 4, None, "ieee", PHASED, interpreted=True)
    assert call.kernel == "phased_rollout_kernel" and call.grid == (1,) and not call.cooperative
    assert call.constexprs["ROWS"] == 32 and call.states.shape == (2, 32, 40)
    on_gpu = build_call(packed, torch.randn(20, 3), None, 4, None, "ieee", PHASED, interpreted=False, n_sms=132)
    assert on_gpu.grid == (6,) and on_gpu.cooperative and on_gpu.constexprs["NPROG"] == 6
    # one counter of finished tiles for each row block of 16 rows (the padded 32: two), zeroed by every launch
    (done,) = on_gpu.zeroed
    assert done.dtype == torch.int32 and done.shape == (2,) and any(arg is done for arg in on_gpu.args)
    assert build_call(packed, torch.randn(20, 3), None, 4, None, "ieee", PHASED, interpreted=False,
                      n_sms=4).grid == (4,)  # one program an SM at most: they wait for each other


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_phased_tiles_count_every_tile_once_per_row_block(interpreter, weight_dtype):
    """Every tile bumps its row block's counter once (kernels/phased.py), also in one program: the final counts are
    what the waits on the GPU count up to. 40 rows in 32-row blocks (the second padded); modes and decoding on 16-row
    tiles (fp32) or modes on 16 and decoding on 32 (bf16), so that phases M and DE cut the blocks."""
    model = wide_model(("s5", {"discretization": "zoh"}), n_layers=2)
    packed = pack_model(model, weight_dtype, event=False, fold=weight_dtype == torch.bfloat16)
    call = build_call(packed, torch.randn(40, model.d_input), None, 5, None, "ieee", replace(PHASED, block_b=32),
                      interpreted=True)
    (done,) = call.zeroed
    done.fill_(-7)  # what a launch must clear
    call.launch(interpreter)
    k = call.constexprs
    decode_rows = 16 if weight_dtype == torch.float32 else 32
    assert (k["BM"], k["BMM"], k["BME"], k["P"], k["BPM"], k["BNC"], k["BFU"]) == (32, 16, decode_rows, 10, 16, 16, 32)
    # a step on one block: the decoding's row tiles, then per layer 2 row tiles x 1 block of the 10 modes, 3 column
    # tiles of d_model 40 twice (readout, down-projection) and 3 blocks of the 80 hidden units; then a last decoding
    decode = 32 // decode_rows
    expected = 5 * (decode + 2 * (2 * 1 + 2 * 3 + 3)) + decode
    assert done.tolist() == [expected, expected]


def test_phased_steps_leave_the_loops_final_state(interpreter):
    model = wide_model(("s5", {"discretization": "zoh"}))
    context, dt = make_data(batch=20, event=True)
    with rollout_mode(model, "cpu"):
        _, state = model.prefill(context, dt[:, :context.shape[1]])
        x0 = torch.randn(20, model.d_input)
        steps = dt[:, context.shape[1]:context.shape[1] + 4]
        out, final = fused_steps(model, x0, state, 4, steps, config=PHASED, return_state=True)
        ref_state = {key: value.clone() for key, value in state.items()}
        ref = run_steps(model, x0, ref_state, 4, steps)
    assert relative_error(out, ref) < FUSED_TOL
    for key, value in ref_state.items():
        assert relative_error(final[key], value) < FUSED_TOL, key
    assert relative_error(final["1.h_re"], state["1.h_re"]) > 1e-3  # the state moved


def test_phased_rollout_follows_an_optimizer_step(interpreter):
    model = wide_model(("s5", {"discretization": "bilinear"}))
    context, dt = make_data(batch=20, event=True)
    before = fused_rollout(model, context, HORIZON, dt, config=PHASED)
    take_an_optimizer_step(model, context, dt)
    model.eval()
    after = fused_rollout(model, context, HORIZON, dt, config=PHASED)
    assert relative_error(after[:, 1:], loop_rollout(model, context, HORIZON, dt)[:, 1:]) < FUSED_TOL
    assert relative_error(after[:, 1:], before[:, 1:]) > 1e-3


def test_phased_tiles_of_other_shapes_and_tensor_core_precisions(interpreter):
    # 32-row tiles with 32-wide columns and 16-wide chunks; one layer; then bf16 weights and tf32x3
    model = wide_model(("lru", {}), n_layers=1, seed=3)
    context, dt = make_data(batch=20, event=True)
    ref = loop_rollout(model, context, HORIZON, dt)
    wide = replace(PHASED, block_b=32, block_n=32)
    assert relative_error(fused_rollout(model, context, HORIZON, dt, config=wide)[:, 1:], ref[:, 1:]) < FUSED_TOL
    tf32x3 = fused_rollout(model, context, HORIZON, dt, precision="tf32x3", config=PHASED)
    assert relative_error(tf32x3[:, 1:], ref[:, 1:]) < FUSED_TOL  # the interpreter computes it in fp32
    bf16 = fused_rollout(model, context, HORIZON, dt, weight_dtype=torch.bfloat16, config=PHASED)
    assert 1e-5 < relative_error(bf16[:, 1:], ref[:, 1:]) < BF16_TOL


@pytest.mark.parametrize("case", [("lru", {}), ("s5", {"discretization": "zoh"})], ids=case_id)
def test_phased_bf16_products_round_as_little_as_the_register_tiles(interpreter, case):
    # on bf16 weights the products after a LayerNorm round h less a centre for each row (fold.py), where the
    # register kernel's tiles round LN(h): rows of h whose mean is large against their spread (an encoder bias
    # of 10) must not err more at the first step (rounding h itself erred 14x more there). Weights packed
    # without the folded copies take the normalising products, as exact; 32-row tiles put the modes and
    # decoding on row tiles of their own (16 and 32 against 32)
    model = wide_model(case)
    with torch.no_grad():
        model.encoder.bias += 10.0
    context, dt = make_data(batch=20, event=True)
    ref = loop_rollout(model, context, HORIZON, dt)
    phased = fused_rollout(model, context, HORIZON, dt, weight_dtype=torch.bfloat16, config=PHASED)
    tiles = fused_rollout(model, context, HORIZON, dt, weight_dtype=torch.bfloat16,
                          config=KernelConfig(block_b=16, block_k=16, activations="registers"))
    phased_first, tiles_first = relative_error(phased[:, 1], ref[:, 1]), relative_error(tiles[:, 1], ref[:, 1])
    assert 1e-4 < phased_first < 1.5 * tiles_first, f"step 1: phased {phased_first:.2e}, register {tiles_first:.2e}"
    assert relative_error(phased[:, 1:], ref[:, 1:]) < BF16_TOL
    x0, state, steps = prefilled(model, context, dt)
    for fold, config in [(False, PHASED), (True, replace(PHASED, block_b=32))]:
        packed = pack_model(model, torch.bfloat16, event=True, fold=fold)
        assert build_call(packed, x0, state, 4, steps, "ieee", config, interpreted=True).constexprs["FOLD"] == fold
        with rollout_mode(model, "cpu"):
            out = fused_steps(model, x0, state, 4, steps, weight_dtype=torch.bfloat16, config=config, packed=packed)
            ref_steps = run_steps(model, x0, {key: value.clone() for key, value in state.items()}, 4, steps)
        first = relative_error(out[:, 0], ref_steps[:, 0])
        assert 1e-4 < first < 1.5 * tiles_first, f"fold={fold}, block_b={config.block_b}: step 1 {first:.2e}"


def prefilled(model, context, dt):
    """(x0, the state after the context, the next 4 timesteps) of a rollout from `context`."""
    with rollout_mode(model, "cpu"):
        _, state = model.prefill(context, dt[:, :context.shape[1]])
    torch.manual_seed(5)
    return torch.randn(context.shape[0], model.d_input), state, dt[:, context.shape[1]:context.shape[1] + 4]


def test_fused_steps_fold_the_norms_only_for_phased_steps_on_bf16_weights(interpreter, monkeypatch):
    asked = []
    real = launch.pack_live
    monkeypatch.setattr(launch, "pack_live", lambda *args: asked.append(args[3]) or real(*args))
    model = wide_model(("lru", {}))
    context, dt = make_data(batch=20, event=True)
    registers = KernelConfig(block_b=16, block_k=16, activations="registers")
    for weight_dtype, config in [(torch.bfloat16, PHASED), (torch.bfloat16, registers), (torch.float32, PHASED),
                                 (torch.bfloat16, None)]:
        fused_rollout(model, context, HORIZON, dt, weight_dtype=weight_dtype, config=config)
    assert asked == [True, False, False, False]  # d_model 40 at 20 rows: no phased steps by default


def test_fused_steps_fold_for_default_phased_steps_at_d_model_128(interpreter, monkeypatch):
    """At a padded d_model of 128 the default launch of bf16 weights is phased past the register tiles' split (on
    the interpreter's one SM, from 3 rows), and `fused_steps` packs the folded copies those steps read."""
    class Packed(Exception):
        pass

    asked = []

    def record(*args):
        asked.append(args[3])
        raise Packed

    monkeypatch.setattr(launch, "pack_live", record)
    model = make_model("lru", d_model=100, d_state=16, n_layers=1)
    context, _ = make_data(batch=20)
    assert default_launch(pack_model(model, torch.bfloat16, event=False), 20, torch.bfloat16, "ieee",
                          1) == phased_config(torch.bfloat16, 100)
    for weight_dtype in (torch.bfloat16, torch.float32):
        with pytest.raises(Packed):
            fused_rollout(model, context, HORIZON, weight_dtype=weight_dtype)
    assert asked == [True, False]  # fp32 weights never fold


def test_phased_launch_errors(interpreter):
    context, _ = make_data(batch=20)
    packed = pack_model(make_model("lru", d_model=512, d_state=128, n_layers=8), torch.float32, event=False)
    with pytest.raises(ValueError, match="32-bit offsets.*2147483648 elements in one buffer \\(1048576 rows.*HINT"):
        check_offsets(packed, rows=1 << 20)
    check_offsets(packed, rows=(1 << 20) - 64)
    with pytest.raises(ValueError, match="phased' implements LRU and S5 .*not Mamba.*HINT"):
        fused_rollout(make_model("mamba"), context, HORIZON, config=PHASED)
    with pytest.raises(ValueError, match="block_b must be one of \\(16, 32, 64\\), got 4.*HINT"):
        fused_rollout(make_model("lru"), context, HORIZON, config=replace(PHASED, block_b=4))
    with pytest.raises(ValueError, match="split=2 splits the register kernel's steps.*HINT: split=None"):
        fused_rollout(make_model("lru"), context, HORIZON, config=replace(PHASED, split=2))


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_wide_modal_models_take_phased_steps_at_large_batch(weight_dtype):
    h100 = 132

    def default(name, d_model, batch, d_state=16):
        packed = pack_model(make_model(name, d_model=d_model, d_state=d_state, n_layers=1), weight_dtype, event=False)
        return default_launch(packed, batch, weight_dtype, "ieee", h100)
    assert default("lru", 512, 1024) == phased_config(weight_dtype)
    assert default("s5", 400, 2 * h100 + 1).activations == "phased"  # d_model 400 pads to 512
    assert default("lru", 512, 2 * h100).activations != "phased"  # two rows per SM: one-row programs
    # from a padded d_model of 256 on, on 32-row tiles below 512
    assert default("s5", 200, 1024) == phased_config(weight_dtype, 200)
    assert phased_config(weight_dtype, 200) == replace(phased_config(weight_dtype), block_b=32)
    # at a padded d_model of 128: exact fp32 past two rows per SM, bf16 where the register kernel's 16-row tiles are
    # too many to split 4 ways (B > 528 on 132 SMs); tf32 dots and d_model 64 never
    fp32 = weight_dtype == torch.float32
    assert default("lru", 128, 4 * h100 + 1) == phased_config(weight_dtype, 128)  # 34 tiles
    assert default("lru", 100, 4 * h100).activations == ("phased" if fp32 else "auto")  # 33 tiles split 4 ways
    assert default("lru", 100, 2 * h100 + 1).activations == ("phased" if fp32 else "auto")
    assert default("lru", 128, 2 * h100).activations != "phased"
    assert default("lru", 64, 16 * h100).activations != "phased"
    packed = pack_model(make_model("s5", d_model=128, n_layers=4), weight_dtype, event=False)
    # 114 SMs (an H100 PCIe), 4 rows per SM: 29 tiles of 16 rows cannot split 4 ways, so bf16 takes phased steps too
    launch_114 = default_launch(packed, 4 * 114, weight_dtype, "ieee", 114)
    assert launch_114 == phased_config(weight_dtype, 128), launch_114
    if fp32:  # the precision of fp32 weights' dots (bf16 weights multiply in bf16)
        for precision in ("tf32x3", "tf32"):
            assert default_launch(packed, 8 * h100, weight_dtype, precision, h100).activations != "phased"
    assert default("mamba", 512, 1024).activations != "phased"  # the phased kernel is modal only
    config = phased_config(weight_dtype)
    assert (config.block_b, config.block_k, config.num_warps) == ((64, 64, 8) if weight_dtype == torch.bfloat16
                                                                  else (64, 32, 4))
    assert phased_config(weight_dtype, 400) == config  # pads to 512
