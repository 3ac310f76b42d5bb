"""The phased fused kernel (kernels/phased.py) compiled on a GPU: many programs, each tile waiting for the tiles of
the phase before it on its rows (the row blocks' counters), against float64 and fp32 loops (the fp32 bound of
test_fused_cuda.py), on tensor cores, from a prefilled state and after an optimizer step.

Run: pytest -m cuda tests/test_fused_phased_cuda.py
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lrnn_lightning.rollout import RolloutEngine, run_steps
from lrnn_lightning.rollout.fused import KernelConfig, fused_rollout, fused_steps
from lrnn_lightning.rollout.fused.config import phased_config
from lrnn_lightning.rollout.fused.fold import FOLDED_KEYS
from lrnn_lightning.rollout.fused.launch import build_call, default_launch, kernel_module
from lrnn_lightning.rollout.fused.pack import pack_model
from lrnn_lightning.rollout.fused.pack_graph import pack_live
from tests.conftest import relative_error
from tests.test_fused import case_id, loop_rollout, take_an_optimizer_step
from tests.test_fused_cuda import (
    BF16_STEPS,
    BF16_TOL,
    HORIZON,
    TF32X3_TOL,
    assert_fp32_accurate,
    gpu_data,
    gpu_model,
)

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("exact_fp32")]

# d_model 96 in 3 column tiles of 32, its hidden units in blocks of 64, the LRU's 24 modes in 2 blocks of 16 (S5's
# 12 in one); 100 rows in 7 row tiles of 16 (the last padded): 21 programs with d_model tiles each, some without
# mode tiles
PHASED = KernelConfig(block_b=16, block_n=32, block_k=32, num_warps=4, activations="phased")
MODAL_CASES = [("lru", {}), ("s5", {"discretization": "zoh"}), ("s5", {"discretization": "bilinear"}),
               ("s5", {"discretization": "dirac"}), ("s5", {"conj_sym": False})]


@pytest.fixture(autouse=True)
def _triton():
    pytest.importorskip("triton")


@pytest.mark.parametrize("event", [False, True], ids=["no-dt", "event-dt"])
@pytest.mark.parametrize("case", MODAL_CASES, ids=case_id)
def test_phased_steps_equal_the_loop_on_gpu(case, event):
    model = gpu_model(*case)
    context, dt = gpu_data(batch=100, event=event)
    out = fused_rollout(model, context, HORIZON, dt, config=PHASED)
    assert_fp32_accurate(model, context, HORIZON, dt, out)
    # every program sums its tiles in a fixed order whatever the others do: the same bits again
    assert torch.equal(fused_rollout(model, context, HORIZON, dt, config=PHASED), out)


@pytest.mark.parametrize("case", [("lru", {}), ("s5", {"discretization": "zoh"})], ids=case_id)
@pytest.mark.parametrize("config", [replace(PHASED, block_b=64, block_n=64, block_k=32, num_warps=4),
                                    replace(PHASED, block_b=32, block_n=64, block_k=64, num_warps=8)],
                         ids=["b64-n64-k32-w4", "b32-n64-k64-w8"])
def test_phased_tiles_on_tensor_cores(config, case):
    """tf32x3 about fp32; bf16 within the bound of test_fused_cuda.test_tf32x3_and_bf16_on_gpu over its first
    steps, and as close to fp32 at the first step as the register kernel's bf16 tiles: the phased kernel
    rounds h less a centre for each row where they round LN(h) (fold.py), errors of one size. 64-row tiles
    take the sm_90 warpgroup products."""
    model = gpu_model(*case)
    context, dt = gpu_data(batch=150, event=True)
    ref = loop_rollout(model, context, HORIZON, dt)
    tf32x3 = fused_rollout(model, context, HORIZON, dt, precision="tf32x3", config=config)
    assert relative_error(tf32x3[:, 1:], ref[:, 1:]) < TF32X3_TOL
    bf16 = fused_rollout(model, context, HORIZON, dt, weight_dtype=torch.bfloat16, config=config)
    error = relative_error(bf16[:, 1:BF16_STEPS + 1], ref[:, 1:BF16_STEPS + 1])
    assert 1e-5 < error < BF16_TOL, f"bf16 relative error {error:.2e} over {BF16_STEPS} steps"
    assert relative_error(bf16[:, 1:], ref[:, 1:]) < 10 * BF16_TOL
    tiles = fused_rollout(model, context, HORIZON, dt, weight_dtype=torch.bfloat16,
                          config=KernelConfig(block_b=16, block_k=32, activations="registers"))
    phased_first, tiles_first = relative_error(bf16[:, 1], ref[:, 1]), relative_error(tiles[:, 1], ref[:, 1])
    assert phased_first < 2 * tiles_first, f"bf16 at step 1: phased {phased_first:.2e}, register {tiles_first:.2e}"
    # the programs' bf16 copies of h, its centres and the state, handed over between programs: the same bits again
    assert torch.equal(fused_rollout(model, context, HORIZON, dt, weight_dtype=torch.bfloat16, config=config), bf16)


def test_phased_bf16_steps_round_as_little_as_the_register_tiles_on_rows_far_from_zero():
    """Rows of h whose mean is large against their spread (an encoder bias of 10): the centred bf16 copy of h
    (fold.py) errs at the first step as little as the register kernel's rounded LN(h), on 64-row tiles with the
    modes on 16 and decoding on 32; and the packing graph keeps the folded and unfolded packings apart."""
    model = gpu_model("lru", d_model=128, d_state=32, n_layers=2)
    with torch.no_grad():
        model.encoder.bias += 10.0
    context, dt = gpu_data(batch=300, event=True)
    ref = loop_rollout(model, context, HORIZON, dt)
    config = KernelConfig(block_b=64, block_n=64, block_k=64, num_warps=8, activations="phased")
    bf16 = fused_rollout(model, context, HORIZON, dt, weight_dtype=torch.bfloat16, config=config)
    tiles = fused_rollout(model, context, HORIZON, dt, weight_dtype=torch.bfloat16,
                          config=KernelConfig(block_b=16, block_k=32, activations="registers"))
    phased_first, tiles_first = relative_error(bf16[:, 1], ref[:, 1]), relative_error(tiles[:, 1], ref[:, 1])
    assert 1e-5 < phased_first < 1.5 * tiles_first, f"step 1: phased {phased_first:.2e}, register {tiles_first:.2e}"
    assert FOLDED_KEYS[0] in pack_live(model, torch.bfloat16, True, True).common
    assert FOLDED_KEYS[0] not in pack_live(model, torch.bfloat16, True, False).common


def test_phased_steps_leave_the_loops_final_state_and_follow_an_optimizer_step():
    model = gpu_model("s5", {"discretization": "zoh"})
    context, dt = gpu_data(batch=100, event=True)
    n_ctx = context.shape[1]
    with torch.no_grad():
        _, state = model.prefill(context, dt[:, :n_ctx])
        x0 = torch.randn(100, model.d_input, device="cuda")
        steps = dt[:, n_ctx:n_ctx + 6]
        out, final = fused_steps(model, x0, state, 6, steps, config=PHASED, return_state=True)
        ref_state = {key: value.clone() for key, value in state.items()}
        ref = run_steps(model, x0, ref_state, 6, steps)
    assert relative_error(out, ref) < 1e-5
    for key, value in ref_state.items():
        assert relative_error(final[key], value) < 1e-5, key
    before = fused_rollout(model, context, HORIZON, dt, config=PHASED)
    take_an_optimizer_step(model, context, dt)
    model.eval()
    after = fused_rollout(model, context, HORIZON, dt, config=PHASED)
    assert_fp32_accurate(model, context, HORIZON, dt, after)
    assert relative_error(after[:, 1:], before[:, 1:]) > 1e-3


def test_phased_large_model_on_gpu():
    # the benchmark's widest shapes (d_model 512, 1024 hidden units, 128 modes), 300 rows in 5 tiles of 64
    model = gpu_model("lru", d_model=512, d_state=128, n_layers=2)
    context, _ = gpu_data(batch=300)
    config = KernelConfig(block_b=64, block_n=64, block_k=32, num_warps=4, activations="phased")
    assert_fp32_accurate(model, context, 20, None, fused_rollout(model, context, 20, config=config))


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_phased_grids_of_any_size_give_the_one_program_bits(weight_dtype):
    """Tiles wait only for their own row block's counter (kernels/phased.py): whatever the grid, and so whichever
    program takes which tiles and runs ahead, the outputs are the bits of one program running every tile in order,
    and each row block's counter ends at the same count. d_model 512 (1024 hidden units), 2 layers: fp32 modes on
    32-row and decoding on 16-row tiles of the 64-row blocks, bf16 modes on 16 and decoding on 32; 300 rows in 5
    blocks, the last padded; grids of 1, 7, 37 and as many programs as the widest phase has tiles (at most one an
    SM)."""
    model = gpu_model("s5", {"discretization": "zoh"}, d_model=512, d_state=128, n_layers=2)
    packed = pack_model(model, weight_dtype, event=True, fold=weight_dtype == torch.bfloat16)
    x0 = torch.randn(300, model.d_input, device="cuda")
    dt = 0.3 + 1.7 * torch.rand(300, 12, device="cuda")
    config = KernelConfig(block_b=64, block_n=64, block_k=32, num_warps=4, activations="phased")
    kernels = kernel_module()
    n_sms = torch.cuda.get_device_properties(0).multi_processor_count
    runs = {}
    for grid in (1, 7, 37, n_sms):
        call = build_call(packed, x0, None, 12, dt, "ieee", config, False, n_sms=grid)
        with torch.no_grad():
            call.launch(kernels)
        torch.cuda.synchronize()
        runs[call.grid[0]] = (call.out.clone(), call.zeroed[0].tolist())
    assert len(runs) == 4 and max(runs) > 37, sorted(runs)
    out, counts = runs[1]
    assert torch.isfinite(out).all() and len(set(counts)) == 1 and len(counts) == 5
    for grid, (other, other_counts) in runs.items():
        assert torch.equal(other, out), f"{grid} programs"
        assert other_counts == counts, f"{grid} programs"


@pytest.mark.parametrize("d_model", [200, 100])
def test_models_of_d_model_128_and_256_take_phased_steps_at_large_batch(d_model):
    """From a padded d_model of 256 on (config.PHASED_MIN_D_MODEL), and at 128 on exact fp32 weights, beyond two rows
    per SM the default launch runs phased steps on 32-row tiles (below 512: config.phased_config), within the fp32
    bound of the loop."""
    model = gpu_model("s5" if d_model < 128 else "lru", d_model=d_model, d_state=32, n_layers=2)
    n_sms = torch.cuda.get_device_properties(0).multi_processor_count
    batch = 2 * n_sms + 36
    context, _ = gpu_data(batch=batch)
    packed = pack_model(model, torch.float32, event=False)
    config = default_launch(packed, batch, torch.float32, "ieee", n_sms)
    assert config == phased_config(torch.float32, d_model) and config.block_b == 32
    assert_fp32_accurate(model, context, HORIZON, None, fused_rollout(model, context, HORIZON))


def test_a_phased_call_launched_again_carries_its_state_on():
    """The row blocks' counters are zeroed by every launch; relaunching one call steps on from its state, as the
    eager step does."""
    model = gpu_model("lru", n_layers=1)
    packed = pack_model(model, torch.float32, event=False)
    x0 = torch.randn(100, model.d_input, device="cuda")
    call = build_call(packed, x0, None, 1, None, "ieee", PHASED, False)
    assert call.cooperative and call.grid[0] > 1
    kernels = kernel_module()
    with torch.no_grad():
        state = model.allocate_state(100)
        for _ in range(4):
            call.out[:, 1:].fill_(float("nan"))
            call.launch(kernels)
            expected = model.step(x0, state)
            assert relative_error(call.out[:, 1], expected) < 1e-5


def test_the_engine_takes_phased_bf16_steps_beyond_two_rows_per_sm():
    """fused="auto" under a bf16 autocast takes the kernel past two rows per SM for a model that runs phased steps
    (selection.wide_modal_bf16), and the graph for the same model in fp32."""
    model = gpu_model("lru", d_model=512, d_state=32, n_layers=1)
    batch = 2 * torch.cuda.get_device_properties(0).multi_processor_count + 36
    context, _ = gpu_data(batch=batch)
    engine = RolloutEngine(model, fused="auto", autocast_dtype=torch.bfloat16)
    out = engine.rollout(context, HORIZON)
    assert engine.stats.path == "fused" and "phased steps on bf16 weights" in engine.stats.backend_reason
    ref = loop_rollout(model, context, HORIZON)
    assert 1e-5 < relative_error(out[:, 1:BF16_STEPS + 1], ref[:, 1:BF16_STEPS + 1]) < BF16_TOL
    engine.release()
    fp32 = RolloutEngine(model, fused="auto", tf32=False)
    fp32.rollout(context, HORIZON)
    assert fp32.stats.path == "graph" and "more than 2 per SM" in fp32.stats.backend_reason
    fp32.release()


@pytest.mark.parametrize("rows_per_sm, steps", [(3, "the register kernel's tiles"), (5, "phased steps")])
def test_the_engine_takes_bf16_steps_at_d_model_128_beyond_two_rows_per_sm(rows_per_sm, steps):
    """fused="auto" under a bf16 autocast takes the kernel past two rows per SM for an S5 model of d_model 128
    (selection.wide_modal_bf16): the register kernel's tiles while they split, phased steps beyond; within the bf16
    bound of the loop."""
    model = gpu_model("s5", d_model=128, d_state=32, n_layers=2)
    n_sms = torch.cuda.get_device_properties(0).multi_processor_count
    batch = (rows_per_sm - 1) * n_sms + 7
    context, _ = gpu_data(batch=batch)
    engine = RolloutEngine(model, fused="auto", autocast_dtype=torch.bfloat16)
    out = engine.rollout(context, HORIZON)
    assert engine.stats.path == "fused" and f"take {steps} on bf16 weights" in engine.stats.backend_reason
    ref = loop_rollout(model, context, HORIZON)
    assert 1e-5 < relative_error(out[:, 1:BF16_STEPS + 1], ref[:, 1:BF16_STEPS + 1]) < BF16_TOL
    engine.release()
