"""The fused rollout kernel compiled on a GPU: against the plain loop (and the CUDA-graph engine) for
every covered mixer and discretisation, with and without event dt, with small tiles (1 and 4 rows
a program, no tl.dot) and tl.dot tiles (16 rows and more), after an optimizer step, in tf32x3 and
bf16, over several programs and feature blocks, through both kernels (register-resident and
scratch, see launch.registers_fit), the packing replayed as a CUDA graph, and the backend choice.

Run: pytest -m cuda tests/test_fused_cuda.py

The fp32 bound. Fused and loop are two fp32 evaluations of the same recurrence in different
summation orders, and an autoregressive rollout amplifies rounding: with these random models
the fp32 loop itself drifts from a float64 loop by ~1e-5 after 11 steps but by 0.3 (Mamba) after
36. So every fp32 check measures both against a float64 loop, on horizons short enough that the
loop's error stays below WELL_CONDITIONED (asserted, so a diverging setup fails instead of passing
vacuously), and asks two things:

- typical accuracy: per batch row, the fused error over the loop's error (+ ACCURACY_FLOOR x the
  row's norm); the median over rows must be at most ACCURACY_RATIO. A row's amplification of
  rounding is the same for both evaluations and cancels in its ratio, and the median over 37
  rows is steady: on the CPU, two equally valid fp32 loops (batched, and row by row through
  other BLAS kernels) gave median ratios below 1.7, either way round, in 150 random contexts
  each of LRU, S4D, S5-zoh, Mamba and RG-LRU; a formula that loses accuracy (exp(x) - 1 for
  small x, a coefficient rounded to a lower precision) gives 10x and more on every row;
- no outliers: the error of the whole rollout is at most OUTLIER_RATIO x the loop's + the floor,
  for mistakes confined to a few rows (padding, one program). Not ACCURACY_RATIO: that error is
  dominated by the one or two rows that amplify rounding most, so it is the ratio of two nearly
  one-dimensional random errors, and the same two CPU loops differed by up to 6.5x there. One such
  sample decided the old single check (3x), which the S5-zoh no-dt case failed at 5.2x on an H100
  while the interpreter, which runs the same formulas on the same coefficients, stays at 0.5-1.2x
  of the loop (12 contexts): fp32 summation noise, not a formula.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from lrnn_lightning.rollout import RolloutEngine, run_steps
from lrnn_lightning.rollout.fused import KernelConfig, choose_backend, fused_rollout, fused_steps, fused_support
from lrnn_lightning.rollout.fused.config import REDUCTION_CHUNK, small_tile_config
from lrnn_lightning.rollout.fused.launch import ROW_RESIDENT, TILE_RESIDENT, build_call, default_launch, kernel_module
from lrnn_lightning.rollout.fused.pack import pack_model
from lrnn_lightning.rollout.fused.pack_graph import _GRAPHS as PACK_GRAPHS
from lrnn_lightning.rollout.fused.pack_graph import MAX_RECAPTURES, PackGraph, pack_live, release_packing
from tests.conftest import relative_error
from tests.helpers import perturb_parameters
from tests.test_fused import CASES, case_id, loop_rollout, make_model, take_an_optimizer_step
from tests.test_rollout import TinyMixer

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("exact_fp32")]

ACCURACY_RATIO, ACCURACY_FLOOR = 3.0, 2e-6
OUTLIER_RATIO = 20.0  # the whole rollout's fused error vs the loop's (see the module doc)
WELL_CONDITIONED = 1e-3  # the fp32 loop's own error vs float64 must stay below this for a meaningful check
TF32X3_TOL = 1e-4  # three TF32 products per fp32 product: about fp32 accuracy (vs the fp32 loop, 11 steps)
BF16_TOL = 5e-2  # bf16 weights (and tl.dot's operands), fp32 accumulation and state, vs the fp32 loop...
BF16_STEPS = 5  # ...over the first 5 fed-back steps (see test_tf32x3_and_bf16_on_gpu)
W, B, C, HORIZON = 5, 37, 9, 12  # 37 rows: 37 programs of one row (the default on an H100), or 3 of 16


@pytest.fixture(autouse=True)
def _triton():
    pytest.importorskip("triton")


def gpu_model(name: str, kwargs: dict | None = None, d_model: int = 96, d_state: int = 24, n_layers: int = 2):
    # d_model 96 > the 64-wide blocks: every matmul loops over a full and a ragged block
    return make_model(name, kwargs, d_model=d_model, d_state=d_state, n_layers=n_layers, width=W).cuda()


def gpu_data(batch: int = B, horizon: int = HORIZON, event: bool = False):
    context = torch.randn(batch, C, W, device="cuda")
    dt = 0.3 + 1.7 * torch.rand(batch, C + horizon, device="cuda") if event else None
    return context, dt


def as_double(model, context, dt):
    return copy.deepcopy(model).double(), context.double(), None if dt is None else dt.double()


def row_errors(a, reference):
    """Per batch row (dim 0): ||a - reference|| in float64."""
    return (a.double() - reference.double()).flatten(1).norm(dim=1)


def check_against_float64(fused, loop32, loop64, what: str = "outputs") -> None:
    """The fused result is as accurate as the fp32 loop, both measured against a float64 loop (module doc)."""
    loop_error = relative_error(loop32, loop64)
    fused_error = relative_error(fused, loop64)
    assert torch.isfinite(fused).all(), what
    assert loop_error < WELL_CONDITIONED, f"{what}: the fp32 loop itself is off by {loop_error:.1e}; shorten the test"
    floor = ACCURACY_FLOOR * loop64.double().flatten(1).norm(dim=1)
    typical = float((row_errors(fused, loop64) / (row_errors(loop32, loop64) + floor)).median())
    assert typical <= ACCURACY_RATIO, \
        f"{what}: per row, fused error / fp32 loop error has median {typical:.2f} (both against float64)"
    assert fused_error <= OUTLIER_RATIO * loop_error + ACCURACY_FLOOR, \
        f"{what}: fused error {fused_error:.2e} vs the fp32 loop's {loop_error:.2e} (both against float64)"


def assert_fp32_accurate(model, context, horizon, dt, out) -> None:
    """The fused rollout `out` is as accurate as the fp32 step loop, both measured against a float64 loop."""
    ref32 = loop_rollout(model, context, horizon, dt)
    model64, context64, dt64 = as_double(model, context, dt)
    ref64 = loop_rollout(model64, context64, horizon, dt64)
    check_against_float64(out[:, 1:], ref32[:, 1:], ref64[:, 1:])
    assert relative_error(ref32[:, -1], ref32[:, 1]) > 1e-2  # the rollout moves


def tile_config(block_b: int) -> KernelConfig:
    return small_tile_config(block_b) if block_b < 16 else KernelConfig(block_b=block_b)


def loop_params():
    """Every case with and without event dt; event dt on one row a program (the H100's default for B=37, so
    the other tests' default launches reuse these compilations), no dt on 16 (tl.dot) or 4 rows in turn."""
    params = []
    for index, case in enumerate(CASES):
        for event in (False, True):
            block_b = 1 if event else (16, 4)[index % 2]
            params.append(pytest.param(case, event, block_b,
                                       id=f"{case_id(case)}-{'event-dt' if event else 'no-dt'}-b{block_b}"))
    return params


@pytest.mark.parametrize("case, event, block_b", loop_params())
def test_fused_equals_the_loop_on_gpu(case, event, block_b):
    # 37 rows: 37 programs of one row, 10 of four (the last with one row), or 3 of 16 (the last mostly padding)
    model = gpu_model(*case)
    context, dt = gpu_data(event=event)
    out = fused_rollout(model, context, HORIZON, dt, config=tile_config(block_b))
    assert_fp32_accurate(model, context, HORIZON, dt, out)


def test_long_rollout_of_a_well_conditioned_model():
    # LRU stays within ~3e-5 of float64 over 100 fed-back steps, so 100 kernel-internal steps can be checked
    model = gpu_model("lru")
    context, dt = gpu_data(horizon=101, event=True)
    assert_fp32_accurate(model, context, 101, dt, fused_rollout(model, context, 101, dt))


@pytest.mark.parametrize("case", [("s5", {"discretization": "zoh"}), ("s4d", {}), ("mamba", {}), ("rglru", {})],
                         ids=case_id)
def test_fused_final_state_on_gpu(case):
    model = gpu_model(*case)
    context, dt = gpu_data(event=True)
    model64, context64, dt64 = as_double(model, context, dt)
    steps = HORIZON - 1
    with torch.no_grad():
        y, state = model.prefill(context, dt[:, :C])
        _, final = fused_steps(model, y[:, -1], state, steps, dt[:, C:C + steps], return_state=True)
        run_steps(model, y[:, -1], state, steps, dt[:, C:C + steps])  # the fp32 loop, in place
        y64, state64 = model64.prefill(context64, dt64[:, :C])
        run_steps(model64, y64[:, -1], state64, steps, dt64[:, C:C + steps])
    assert set(final) == set(state)
    for key in state:
        check_against_float64(final[key], state[key], state64[key], f"state {key}")


def test_fused_follows_an_optimizer_step_on_gpu():
    model = gpu_model("s5", {"discretization": "bilinear"})
    context, dt = gpu_data(event=True)
    before = fused_rollout(model, context, HORIZON, dt)
    take_an_optimizer_step(model, context, dt)
    model.eval()
    after = fused_rollout(model, context, HORIZON, dt)
    assert_fp32_accurate(model, context, HORIZON, dt, after)
    assert relative_error(after[:, 1:], before[:, 1:]) > 1e-3


@pytest.mark.parametrize("activations", ["registers", "scratch"])
@pytest.mark.parametrize("case", [("lru", {}), ("s5", {"discretization": "zoh"})], ids=case_id)
def test_tf32x3_and_bf16_on_gpu(case, activations):
    """tf32x3 is about fp32 over the whole rollout; bf16 is checked over the first BF16_STEPS steps.

    bf16 rounding errs ~5e-3-1e-2 at the first step for LRU and S5 alike, and then grows at the
    model's own rate of error amplification: measured in the interpreter on these shapes, LRU
    reaches 2-3e-2 after the 11 fed-back steps of HORIZON, S5-zoh (conj_sym) 7e-2-1.1e-1 (tl.dot
    tiles; small tiles about half). No S5 quantity is rounded that should not be: the
    discretised coefficients stay fp32, and keeping S5's B and C in fp32 too changes its error
    by < 1e-6 (relative); what the error is made of is the bf16 rounding of every matmul, half
    of it the activations that tl.dot tiles round for the tensor cores. So the bound holds
    over 5 steps (measured <= 2.5e-2), and over the whole rollout the bf16 path only has to stay
    within 10x of it (not diverge).
    """
    model = gpu_model(*case)
    context, dt = gpu_data(event=True)
    ref = loop_rollout(model, context, HORIZON, dt)
    dot = KernelConfig(block_b=16, block_k=32, activations=activations)  # tensor cores need tl.dot tiles
    tf32x3 = fused_rollout(model, context, HORIZON, dt, precision="tf32x3", config=dot)
    error = relative_error(tf32x3[:, 1:], ref[:, 1:])
    assert error < TF32X3_TOL, f"tf32x3 relative error {error:.2e}"
    # bf16: on tl.dot tiles (activations rounded to bf16 too) and on small tiles (weights widened to fp32)
    for config in (dot, replace(small_tile_config(1), activations=activations)):
        bf16 = fused_rollout(model, context, HORIZON, dt, weight_dtype=torch.bfloat16, config=config)
        error = relative_error(bf16[:, 1:BF16_STEPS + 1], ref[:, 1:BF16_STEPS + 1])
        assert 1e-5 < error < BF16_TOL, f"bf16 relative error {error:.2e} over {BF16_STEPS} steps, {config}"
        assert relative_error(bf16[:, 1:], ref[:, 1:]) < 10 * BF16_TOL, f"bf16 over {HORIZON - 1} steps, {config}"


@pytest.mark.parametrize("config", [KernelConfig(block_b=32, block_n=64, block_k=32, num_warps=8),
                                    KernelConfig(block_b=64, block_n=32, block_k=16, num_warps=4),
                                    small_tile_config(2), small_tile_config(8)],
                         ids=["b32-n64-k32-w8", "b64-n32-k16-w4", "b2-small", "b8-small"])
def test_kernel_configs_agree(config):
    # 100 rows: 4, 2, 50 or 13 programs, the last partly padding
    model = gpu_model("lru")
    context, dt = gpu_data(batch=100, event=True)
    assert_fp32_accurate(model, context, HORIZON, dt, fused_rollout(model, context, HORIZON, dt, config=config))


def test_large_model_on_gpu():
    # the benchmark's widest shapes: d_model 512, MLP hidden 1024, 128 modes (too wide for the register
    # kernel); 300 rows: the default (phased steps, kernels/phased.py), 16-row tl.dot tiles of the scratch
    # kernel (19 programs) and 4-row small tiles (75 programs)
    model = gpu_model("lru", d_model=512, d_state=128, n_layers=2)
    context, _ = gpu_data(batch=300)
    for config in (None, KernelConfig(block_b=16), small_tile_config(4)):
        assert_fp32_accurate(model, context, 20, None, fused_rollout(model, context, 20, config=config))


def test_fused_equals_the_graph_engine():
    model = gpu_model("mamba")
    context, dt = gpu_data(event=True)
    engine = RolloutEngine(model, chunk=4, event_mode=True)
    graph = engine.rollout(context, HORIZON, dt)
    engine.release()
    assert engine.stats.path == "graph"
    out = fused_rollout(model, context, HORIZON, dt)
    assert relative_error(out[:, 1:], graph[:, 1:]) < WELL_CONDITIONED
    assert_fp32_accurate(model, context, HORIZON, dt, out)


def test_choose_backend_on_gpu():
    model = gpu_model("lru")
    assert fused_support(model)[0]
    backend, reason = choose_backend(model, fused="auto")
    assert backend == "fused" and "Triton" in reason
    assert choose_backend(model, fused=False)[0] == "graph"
    assert choose_backend(model, fused=True)[0] == "fused"
    assert choose_backend(model, fused="auto", weight_dtype=torch.float16)[0] == "graph"
    backend, reason = choose_backend(make_model(TinyMixer).cuda(), fused="auto")
    assert backend == "graph" and "TinyMixer is not covered" in reason
    with pytest.raises(ValueError, match="TinyMixer is not covered"):
        choose_backend(make_model(TinyMixer).cuda(), fused=True)


def assert_packs_equal(packed, reference) -> None:
    # one-element mixer slots are the unused slots' placeholders: never read, left uninitialised
    used = {index: value for index, value in enumerate(packed.mixer) if value.numel() > 1}
    for name, value in {**packed.common, **used}.items():
        other = {**reference.common, **dict(enumerate(reference.mixer))}[name]
        torch.testing.assert_close(value, other, rtol=1e-6, atol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_the_packing_graph_follows_the_live_weights_and_recaptures():
    model = gpu_model("s5", {"discretization": "zoh"})
    context, dt = gpu_data(event=True)
    key = (torch.float32, True)
    assert_packs_equal(pack_live(model, *key), pack_model(model, *key))
    (graph,) = PACK_GRAPHS[model].values()  # one packing: this dtype, event mode and stream
    take_an_optimizer_step(model, context, dt)  # in place: the same graph, replayed on the new values
    model.eval()
    packed = pack_live(model, *key)
    assert list(PACK_GRAPHS[model].values()) == [graph]
    assert_packs_equal(packed, pack_model(model, *key))
    # new storage (load_state_dict(assign=True)) is a new fingerprint: captured again, never the old memory
    model.load_state_dict({name: value.clone() for name, value in model.state_dict().items()}, assign=True)
    perturb_parameters(model, scale=0.01, seed=7)  # and values the old graph never saw
    packed = pack_live(model, *key)
    assert graph not in PACK_GRAPHS[model].values() and len(PACK_GRAPHS[model]) == 1
    assert_packs_equal(packed, pack_model(model, *key))
    assert_fp32_accurate(model, context, HORIZON, dt, fused_rollout(model, context, HORIZON, dt))
    release_packing(model)
    assert model not in PACK_GRAPHS


def test_a_model_replaced_at_every_rollout_is_packed_eagerly():
    model = gpu_model("lru")
    key = (torch.float32, False)
    with pytest.warns(UserWarning, match=f"replaced {MAX_RECAPTURES} times; packing its weights eagerly"):
        for _ in range(MAX_RECAPTURES + 1):
            model.load_state_dict({name: value.clone() for name, value in model.state_dict().items()}, assign=True)
            pack_live(model, *key)
    perturb_parameters(model, scale=0.01, seed=3)
    assert_packs_equal(pack_live(model, *key), pack_model(model, *key))
    assert not any(isinstance(entry, PackGraph) for entry in PACK_GRAPHS[model].values())


@pytest.mark.parametrize("event", [False, True], ids=["no-dt", "event-dt"])
@pytest.mark.parametrize("name", ["lru", "mamba"])
@pytest.mark.parametrize("num_warps", [4, 8])
def test_register_kernel_at_the_benchmark_widths(num_warps, name, event):
    # d_model 128, 64 modes / states, MLP hidden 256, Mamba's 256 channels: several blocks of each, one row a
    # program
    model = gpu_model(name, d_model=128, d_state=64, n_layers=2)
    context, dt = gpu_data(event=event)
    config = replace(small_tile_config(1), num_warps=num_warps, activations="registers")
    assert_fp32_accurate(model, context, HORIZON, dt, fused_rollout(model, context, HORIZON, dt, config=config))


# -- split steps: several programs per row tile (kernels/group.py) ---------------------------------

SPLIT_BATCH = 13  # 13 one-row tiles x 8 programs = 104: resident together on an H100 or H200
SPLIT_CASES = [("lru", {}), ("s5", {"discretization": "bilinear"}), ("mamba", {})]


def split_config(split: int) -> KernelConfig:
    return replace(small_tile_config(1), num_warps=8, split=split)


@pytest.mark.parametrize("split", [2, 3, 4, 8])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=case_id)
def test_split_steps_equal_the_loop(case, split):
    # d_model 128: 64 modes, 256 MLP units (and Mamba channels), so every program has blocks of its own
    model = gpu_model(*case, d_model=128, d_state=64)
    context, dt = gpu_data(batch=SPLIT_BATCH, event=True)
    out = fused_rollout(model, context, HORIZON, dt, config=split_config(split))
    assert_fp32_accurate(model, context, HORIZON, dt, out)
    # the exchange buffers are zeroed again, and every program adds the partial sums in the same order
    assert torch.equal(fused_rollout(model, context, HORIZON, dt, config=split_config(split)), out)


def test_a_split_call_launched_twice_gives_the_same_numbers():
    """One step of a one-layer model makes exactly two exchanges (tags 1 and 2), which a second launch of the
    same call would find still in its slots if they were not zeroed again: it would add the first launch's
    partials without waiting for its own."""
    from lrnn_lightning.rollout.fused.launch import kernel_module

    model = gpu_model("lru", d_model=128, d_state=64, n_layers=1)
    packed = pack_model(model, torch.float32, event=False)
    x0 = torch.randn(SPLIT_BATCH, model.d_input, device="cuda")
    call = build_call(packed, x0, None, 1, None, "ieee", split_config(4), False)
    assert call.constexprs["TAGGED"] and call.constexprs["SPLIT"] == 4
    kernels = kernel_module()
    with torch.no_grad():
        state = model.allocate_state(SPLIT_BATCH)
        for _ in range(4):  # the kernel and the eager step both carry their state on from launch to launch
            call.out[:, 1:].fill_(float("nan"))
            call.launch(kernels)
            expected = model.step(x0, state)
            assert relative_error(call.out[:, 1], expected) < 1e-5


@pytest.mark.parametrize("case", [("lru", {}), ("s5", {"discretization": "zoh"})], ids=case_id)
def test_the_default_launch_of_a_narrow_model_splits_on_four_warps_and_equals_the_loop(case):
    # d_model 64, 2 layers (about 130 KB of weights a layer): the default splits each row's step over 4
    # programs of NARROW_SPLIT_WARPS warps (launch.split_pays), where it was 8 warps unsplit before
    from lrnn_lightning.rollout.fused.config import NARROW_SPLIT_WARPS

    model = gpu_model(*case, d_model=64, d_state=32)
    context, dt = gpu_data(batch=SPLIT_BATCH, event=True)
    n_sms = torch.cuda.get_device_properties(0).multi_processor_count
    packed = pack_model(model, torch.float32, event=True)
    default = default_launch(packed, SPLIT_BATCH, torch.float32, "ieee", n_sms)
    call = build_call(packed, context[:, -1], None, 2, dt[:, :2], "ieee", default, False)
    assert default.num_warps == NARROW_SPLIT_WARPS and call.constexprs["SPLIT"] > 1 and call.constexprs["TAGGED"]
    out = fused_rollout(model, context, HORIZON, dt)  # config None: default_launch
    assert_fp32_accurate(model, context, HORIZON, dt, out)


@pytest.mark.parametrize("case", [("lru", None), ("s5", {"discretization": "zoh"}), ("mamba", None)],
                         ids=["lru", "s5-zoh", "mamba"])
def test_bf16_one_row_steps_sum_chunked_tiles_as_flat_ones(case):
    # bf16 weights, one row a program: the default launch splits and loads its tiles chunked (common.load_tile;
    # Mamba its MLP's); forced flat, the same launch must give the same numbers, and the default stays within
    # the bf16 bound of the fp32 loop
    model = gpu_model(*case, d_model=128, d_state=64)
    context, dt = gpu_data(batch=SPLIT_BATCH, event=True)
    packed = pack_model(model, torch.bfloat16, event=True)
    n_sms = torch.cuda.get_device_properties(0).multi_processor_count
    config = default_launch(packed, SPLIT_BATCH, torch.bfloat16, "ieee", n_sms)
    steps = HORIZON - 1
    chunked, flat = (build_call(packed, context[:, -1], None, steps, dt[:, :steps], "ieee", config, False)
                     for _ in range(2))
    assert chunked.constexprs["CHUNK"] == REDUCTION_CHUNK and chunked.constexprs["SPLIT"] > 1
    flat.constexprs["CHUNK"] = 0
    chunked.launch(kernel_module())
    flat.launch(kernel_module())
    # only the order of fp32 sums differs: about 3e-7 at the first step, which the rollout then amplifies as
    # it does a split step's (at step 11 Mamba's chunked and its unsplit flat launch both reach 5-8e-4 of the
    # split flat one: RESULTS.md, eleventh session), hence the first BF16_STEPS steps
    deviation = relative_error(chunked.out[:, 1:BF16_STEPS + 1], flat.out[:, 1:BF16_STEPS + 1])
    assert deviation < 1e-5, f"chunked vs flat tiles: relative deviation {deviation:.2e}"
    assert relative_error(flat.out[:, -1], flat.out[:, 1]) > 1e-2  # the rollout moves
    out = fused_rollout(model, context, HORIZON, dt, weight_dtype=torch.bfloat16)
    ref = loop_rollout(model, context, HORIZON, dt)
    error = relative_error(out[:, 1:BF16_STEPS + 1], ref[:, 1:BF16_STEPS + 1])
    assert 1e-5 < error < BF16_TOL, f"bf16 relative error {error:.2e} over {BF16_STEPS} steps"


@pytest.mark.parametrize("name", ["lru", "mamba"])
def test_split_steps_leave_the_loops_final_state(name):
    # no dt; each program writes only its own modes / channels of the state
    model = gpu_model(name, d_model=128, d_state=64)
    context, _ = gpu_data(batch=SPLIT_BATCH)
    model64, context64, _ = as_double(model, context, None)
    steps = HORIZON - 1
    with torch.no_grad():
        y, state = model.prefill(context)
        out, final = fused_steps(model, y[:, -1], state, steps, return_state=True, config=split_config(4))
        loop_out = run_steps(model, y[:, -1], state, steps)  # the fp32 loop, in place
        y64, state64 = model64.prefill(context64)
        loop64 = run_steps(model64, y64[:, -1], state64, steps)
    check_against_float64(out, loop_out, loop64)
    for key in state:
        check_against_float64(final[key], state[key], state64[key], f"state {key}")


def test_the_default_splits_a_small_batch_and_refuses_a_grid_beyond_the_sms():
    model = gpu_model("mamba", d_model=128, d_state=64)
    packed = pack_model(model, torch.float32, event=False)
    n_sms = torch.cuda.get_device_properties(0).multi_processor_count
    expected = max(s for s in (1, 2, 4, 8) if 16 * s <= n_sms)  # 8 on an H100 or H200
    call = build_call(packed, torch.randn(16, W, device="cuda"), None, 2, None, "ieee", split_config(None), False)
    assert call.constexprs["SPLIT"] == expected and call.grid == (16 * expected,)
    assert call.cooperative == (expected > 1)
    with pytest.raises(ValueError, match=f"more than the {n_sms} SMs"):
        fused_steps(model, torch.randn(n_sms, W, device="cuda"), None, 2, config=split_config(2))


@pytest.mark.parametrize("name", ["lru", "mamba"])
def test_split_steps_with_bf16_weights_and_on_tensor_cores(name):
    # a split step changes only the order of fp32 sums: bf16 weights (small tiles widen them to fp32) and
    # tf32x3 tl.dot tiles of 16 rows give, split, what they give unsplit, to fp32 summation noise
    model = gpu_model(name, d_model=128, d_state=64)
    context, dt = gpu_data(batch=SPLIT_BATCH, event=True)
    shapes = [(split_config(1), {"weight_dtype": torch.bfloat16})]
    if name == "lru":  # Mamba's 16-row state tiles do not fit the register kernel (registers_fit)
        shapes.append((KernelConfig(block_b=16, block_k=32, split=1), {"precision": "tf32x3"}))
    for base, options in shapes:
        whole = fused_rollout(model, context, HORIZON, dt, config=base, **options)
        for split in (2, 8):
            parts = fused_rollout(model, context, HORIZON, dt, config=replace(base, split=split), **options)
            error = relative_error(parts[:, 1:], whole[:, 1:])
            assert error < 1e-4, f"split {split} vs unsplit, {options}: relative deviation {error:.2e}"


@pytest.mark.parametrize("name, d_model, block_b, split", [("lru", 32, 1, 8), ("mamba", 128, 4, 4), ("s5", 128, 2, 2)],
                         ids=["idle-ranks", "mamba-padded-tiles", "s5-two-rows"])
def test_split_steps_with_idle_ranks_and_padded_tiles(name, d_model, block_b, split):
    # d_model 32: 16 modes, one block, so 7 of 8 ranks add nothing in the mixer; 13 rows in tiles of 4 (the last
    # holds one row) or 2
    kwargs = {"discretization": "zoh"} if name == "s5" else None
    model = gpu_model(name, kwargs, d_model=d_model, d_state=16 if d_model == 32 else 64)
    context, dt = gpu_data(batch=SPLIT_BATCH, event=True)
    config = replace(small_tile_config(block_b), num_warps=8, split=split)
    assert_fp32_accurate(model, context, HORIZON, dt, fused_rollout(model, context, HORIZON, dt, config=config))


# -- one-layer models whose weights and state stay in registers (kernels/resident.py) ----------------

RESIDENT_CASES = [("lru", {}), ("s5", {"discretization": "zoh"}), ("s5", {"discretization": "bilinear"})]


@pytest.mark.parametrize("event", [False, True], ids=["no-dt", "event-dt"])
@pytest.mark.parametrize("case", RESIDENT_CASES, ids=case_id)
def test_one_layer_models_run_resident_on_gpu(case, event):
    # the benchmark's (32, 32, 16, 1) shape: 16 modes, 64 hidden units; one row a program with 8 and 4 warps
    # (resident_row_steps), two rows (resident_modal_steps)
    model = gpu_model(*case, d_model=32, d_state=16, n_layers=1)
    context, dt = gpu_data(event=event)
    packed = pack_model(model, torch.float32, event=event)
    for rows, num_warps, path in ((1, 8, ROW_RESIDENT), (1, 4, ROW_RESIDENT), (2, 8, TILE_RESIDENT)):
        config = replace(small_tile_config(rows), num_warps=num_warps)
        call = build_call(packed, context[:, -1], None, 2, dt[:, :2] if event else None, "ieee", config, False)
        assert call.constexprs["RESIDENT"] == path, (rows, num_warps)
        out = fused_rollout(model, context, HORIZON, dt, config=config)
        assert_fp32_accurate(model, context, HORIZON, dt, out)
    n_sms = torch.cuda.get_device_properties(0).multi_processor_count
    default = default_launch(packed, B, torch.float32, "ieee", n_sms)  # what the config=None call below takes
    assert build_call(packed, context[:, -1], None, 2, None, "ieee", default, False).constexprs["RESIDENT"]
    with torch.no_grad():  # the state written back after the last step
        y, state = model.prefill(context, dt[:, :C] if event else None)
        dt_steps = dt[:, C:C + HORIZON - 1] if event else None
        out, final = fused_steps(model, y[:, -1], state, HORIZON - 1, dt_steps, return_state=True)
        loop_out = run_steps(model, y[:, -1], state, HORIZON - 1, dt_steps)
    assert relative_error(out, loop_out) < 1e-4
    for key in state:
        assert relative_error(final[key], state[key]) < 1e-4, key


# -- the launch shape fused_steps takes by default (launch.default_launch) -----------------------------

@pytest.mark.parametrize("name", ["lru", "mamba"])
def test_the_default_launch_at_a_mid_batch_on_tensor_cores(name):
    # LRU: 16-row tl.dot tiles split 8 ways (4 warps); Mamba, whose 16-row state tiles do not fit registers:
    # one-row programs instead of the scratch kernel's tiles. tf32x3 (about fp32) against the loop.
    n_sms = torch.cuda.get_device_properties(0).multi_processor_count
    batch = 16 * (n_sms // 8)  # 16 row tiles of 16 on an H100 or H200
    model = gpu_model(name, d_model=128, d_state=64)
    horizon = HORIZON if name == "lru" else 7  # Mamba: the fp32 loop's own drift over 264 rows stays < 1e-3
    context, dt = gpu_data(batch=batch, horizon=horizon, event=True)
    config = default_launch(pack_model(model, torch.float32, event=True), batch, torch.float32, "tf32x3", n_sms)
    if name == "lru":
        assert (config.block_b, config.split, config.num_warps) == (16, 8, 4)
    else:
        assert (config.block_b, config.split, config.num_warps) == (1, None, 4)
    out = fused_rollout(model, context, horizon, dt, precision="tf32x3")  # config None: default_launch
    assert torch.equal(out, fused_rollout(model, context, horizon, dt, precision="tf32x3", config=config))
    if name == "mamba":  # one-row programs multiply in exact fp32 whatever the precision
        assert_fp32_accurate(model, context, horizon, dt, out)
    else:
        error = relative_error(out[:, 1:], loop_rollout(model, context, horizon, dt)[:, 1:])
        assert error < TF32X3_TOL, f"tf32x3 relative error {error:.2e} with {config}"
