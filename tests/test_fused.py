"""The fused rollout backend on the CPU: backend selection and fallbacks (no Triton needed), and the
kernel itself under the Triton interpreter against the plain step loop.

Semantics under test (lrnn_lightning/rollout/fused/launch.py): fused_rollout(model, context, T, dt)
== rollout_loop(model, context, T, dt) for every covered mixer and discretisation, with and
without event dt, from a real prefilled state, and again after an optimizer step, with
tl.dot tiles (16 rows a program) and with the small tiles (1, 2, 4, 8 rows, no tl.dot), through
both kernels (the register-resident one for LRU, S5 and Mamba, the scratch one for every mixer;
which one runs, and why not, is tested too); and the launch-shape rule of config.py.

Interpreter tests need Triton and run only where no GPU is present (on a GPU the compiled
kernel is tested by test_fused_cuda.py); they are tiny because the interpreter is slow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch

from lrnn_lightning.models import SequenceModel
from lrnn_lightning.models.backbone import GatedMLP
from lrnn_lightning.rollout import rollout_loop, run_steps
from lrnn_lightning.rollout.fused import (
    KernelConfig,
    choose_backend,
    default_config,
    fused_rollout,
    fused_steps,
    fused_support,
    launch,
    model_coverage,
    support,
)
from lrnn_lightning.rollout.fused.config import (
    DOT_SPLIT_WARPS,
    MAX_ONE_ROW_PROGRAMS_PER_SM,
    MAX_SPLIT,
    NARROW_SPLIT_WARPS,
    ONE_ROW_WARPS,
    REDUCTION_CHUNK,
    RESIDENT_WARPS,
    SMALL_BLOCK_BS,
    SMALL_TILE,
    SPLIT_MIN_WEIGHT_BYTES,
    default_split,
    processor_count,
    small_tile_config,
)
from lrnn_lightning.rollout.fused.launch import (
    ROW_RESIDENT,
    TILE_RESIDENT,
    build_call,
    default_launch,
    registers_fit,
    split_pays,
    tagged_exchange,
    weight_bytes,
)
from lrnn_lightning.rollout.fused.pack import pack_model
from lrnn_lightning.rollout.fused.selection import AUTO_MAX_ROWS_PER_SM, choose_fused
from lrnn_lightning.rollout.inference import rollout_mode
from tests.conftest import relative_error
from tests.helpers import count_calls, import_interpreted, perturb_parameters, random_dt
from tests.test_rollout import TinyMixer

FUSED_TOL = 1e-5  # fused vs loop, fp32 ("ieee" dots): same math, different summation order
BF16_TOL = 5e-2  # bf16 matmul weights and operands (fp32 accumulation) vs the fp32 loop
W, B, C, HORIZON = 3, 5, 4, 5

LTI_CASES = [("lru", {}), ("s4d", {}), ("s5", {"discretization": "zoh"}), ("s5", {"discretization": "bilinear"}),
             ("s5", {"discretization": "dirac"}), ("s5", {"conj_sym": False})]
LTV_CASES = [("mamba", {}), ("rglru", {})]
CASES = LTI_CASES + LTV_CASES
DOT_TILE = KernelConfig(block_b=16)  # tl.dot tiles (the default config on the CPU picks small tiles for B=5)


def case_id(case) -> str:
    name, kwargs = case
    return name + "".join(f"-{value}" for value in kwargs.values())


def make_model(name: str, kwargs: dict | None = None, d_model: int = 8, d_state: int = 4, n_layers: int = 2,
               width: int = W, seed: int = 0) -> SequenceModel:
    torch.manual_seed(seed)
    model = SequenceModel(name, d_input=width, d_output=width, d_model=d_model, d_state=d_state, n_layers=n_layers,
                          mixer_kwargs=kwargs)
    perturb_parameters(model, scale=0.1, seed=seed + 1)
    return model.eval()


def make_data(batch: int = B, n_ctx: int = C, horizon: int = HORIZON, event: bool = False, device=None):
    context = torch.randn(batch, n_ctx, W, device=device)
    dt = random_dt(batch, n_ctx + horizon, device=device) if event else None
    return context, dt


def loop_rollout(model, context, horizon, dt=None):
    with rollout_mode(model, context.device.type):
        return rollout_loop(model, context, horizon, dt)


def clone_state(state):
    return {key: value.clone() for key, value in state.items()}


# -- backend selection and coverage: no Triton needed ------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_zoo_mixer_is_covered(case):
    covered, why = model_coverage(make_model(*case))
    assert covered, why


def test_uncovered_models_say_why():
    covered, why = model_coverage(make_model(TinyMixer))
    assert not covered and "TinyMixer is not covered" in why
    assert "is not a SequenceModel" in model_coverage(torch.nn.Linear(3, 3))[1]
    model = make_model("lru")
    model.layers[1].mlp_norm.eps = 1e-3
    assert model_coverage(model) == (False, "LayerNorms with different eps")
    odd = SequenceModel("lru", d_input=3, d_output=2, d_model=8, d_state=4, n_layers=1)
    assert "d_input=3 != d_output=2" in model_coverage(odd)[1]
    # the kernel reads each weight from one stack over layers: the layers must agree in size and settings
    pairs = [(make_model("s5", {"discretization": "zoh"}), make_model("s5", {"discretization": "dirac"})),
             (make_model("lru"), make_model("lru", d_state=8)), (make_model("mamba"), make_model("mamba", d_state=8))]
    for mixed, other in pairs:
        assert model_coverage(mixed)[0]
        mixed.layers[1] = other.layers[1]
        covered, why = model_coverage(mixed)
        assert not covered and why.startswith("layers of different sizes or mixer settings"), (mixed.mixer_name, why)


def test_choose_backend_on_the_cpu_falls_back_to_the_loop(monkeypatch):
    monkeypatch.setattr(support, "interpreter_active", lambda: False)
    model = make_model("lru")
    backend, reason = choose_backend(model, fused="auto", cuda_graph="auto")
    assert backend == "loop" and "not a CUDA GPU" in reason and "no CUDA GPU" in reason
    assert choose_backend(model, fused=False, cuda_graph=False) == ("loop", "fused=false; plain step loop "
                                                                             "(cuda_graph=false)")
    with pytest.raises(ValueError, match="fused=True, but .* not a CUDA GPU.*HINT: set generation.fused=auto"):
        choose_backend(model, fused=True)
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA GPU"):
        choose_backend(model, fused="auto", cuda_graph=True)


def test_auto_takes_the_kernel_up_to_two_rows_per_sm(monkeypatch):
    monkeypatch.setattr(support, "interpreter_active", lambda: True)  # the CPU model counts as covered
    model = make_model("lru")
    limit = AUTO_MAX_ROWS_PER_SM * 132
    for batch in (1, 32, limit, None):
        assert choose_fused(model, "auto", None, on_gpu=True, batch=batch, n_sms=132).fused, batch
    choice = choose_fused(model, "auto", None, on_gpu=True, batch=limit + 1, n_sms=132)
    assert not choice.fused and choice.refusal is None
    assert choice.reason == (f"fused=auto, not fused: {limit + 1} rows are more than {AUTO_MAX_ROWS_PER_SM} per SM "
                             "(132 SMs), where the CUDA graph was faster (fused=true forces the kernel)")
    assert choose_fused(model, True, None, on_gpu=True, batch=100_000, n_sms=132).fused
    assert not choose_fused(model, "auto", None, on_gpu=False, batch=1, n_sms=132).fused


def test_auto_takes_phased_bf16_steps_at_large_batch(monkeypatch):
    monkeypatch.setattr(support, "interpreter_active", lambda: True)  # the CPU model counts as covered
    wide = make_model("lru", d_model=512, d_state=16, n_layers=1)
    batch = 4 * 132
    choice = choose_fused(wide, "auto", torch.bfloat16, on_gpu=True, batch=batch, n_sms=132)
    assert choice.fused and "528 rows on 132 SMs take phased steps on bf16 weights" in choice.reason
    assert default_launch(pack_model(wide, torch.bfloat16, event=False), batch, torch.bfloat16, "ieee",
                          132).activations == "phased"  # what the reason says is what runs
    # fp32 weights, a mixer or a width not measured faster than the graph: the graph, as beyond two rows per SM
    assert not choose_fused(wide, "auto", None, on_gpu=True, batch=batch, n_sms=132).fused
    for model in (make_model("mamba", d_model=512, n_layers=1), make_model("s5", d_model=64, n_layers=1)):
        assert not choose_fused(model, "auto", torch.bfloat16, on_gpu=True, batch=batch, n_sms=132).fused
    # d_model 128 (padded; 100 here) on bf16 weights: the register kernel's tiles up to 4 rows per SM, phased beyond
    narrow = make_model("s5", d_model=100, n_layers=1)
    packed = pack_model(narrow, torch.bfloat16, event=False)
    for rows, steps in ((batch, "the register kernel's tiles"), (batch + 1, "phased steps")):
        choice = choose_fused(narrow, "auto", torch.bfloat16, on_gpu=True, batch=rows, n_sms=132)
        assert choice.fused and f"{rows} rows on 132 SMs take {steps} on bf16 weights" in choice.reason
        launch = default_launch(packed, rows, torch.bfloat16, "ieee", 132)
        assert (launch.activations == "phased") == (steps == "phased steps"), (rows, launch)
    assert not choose_fused(narrow, "auto", None, on_gpu=True, batch=batch, n_sms=132).fused


def test_choose_backend_without_triton(monkeypatch):
    monkeypatch.setattr(support, "triton_version", lambda: None)
    model = make_model("s5")
    assert fused_support(model) == (False, "Triton is not importable (pip install triton)")
    with pytest.raises(ValueError, match="Triton is not importable"):
        choose_backend(model, fused=True)
    backend, reason = choose_backend(model, fused="auto")
    assert backend == "loop" and "Triton is not importable" in reason


def test_choose_backend_rejects_uncovered_models_and_bad_values():
    with pytest.raises(ValueError, match="TinyMixer is not covered"):
        choose_backend(make_model(TinyMixer), fused=True)
    backend, reason = choose_backend(make_model(TinyMixer), fused="auto", cuda_graph=False)
    assert backend == "loop" and "TinyMixer is not covered" in reason
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="fused must be True, False or 'auto'"):
            choose_backend(make_model("lru"), fused=bad)
    with pytest.raises(ValueError, match="cuda_graph must be True, False or 'auto'"):
        choose_backend(make_model("lru"), cuda_graph="always")


def test_fused_support_rejects_unsupported_weights(monkeypatch):
    monkeypatch.setattr(support, "interpreter_active", lambda: True)
    model = make_model("lru").double()
    covered, why = fused_support(model)
    assert not covered and "torch.float64" in why


def test_fused_support_answers_again_when_the_model_changes(monkeypatch):
    monkeypatch.setattr(support, "interpreter_active", lambda: True)
    pytest.importorskip("triton")
    asked = count_calls(monkeypatch, support, "model_coverage")
    model = make_model("lru")
    assert fused_support(model)[0] and fused_support(model)[0] and len(asked) == 1  # kept while nothing changed
    model.double()  # every tensor replaced
    covered, why = fused_support(model)
    assert not covered and "torch.float64" in why and len(asked) == 2
    model.float()
    assert fused_support(model)[0] and len(asked) == 3
    # a module swapped for another type that keeps the same tensors: same fingerprint, new answer
    block, other_mlp = model.layers[0], type("OtherMLP", (GatedMLP,), {})
    swapped = other_mlp(model.d_model)
    swapped.up, swapped.down = block.mlp.up, block.mlp.down
    block.mlp = swapped
    covered, why = fused_support(model)
    assert not covered and why == "a layer is not the standard ResidualBlock with a GatedMLP" and len(asked) == 4


# -- the launch-shape rule: pure, no Triton needed ------------------------------------------------

def test_default_config_on_an_h100():
    h100 = 132
    # exact fp32: one-row programs up to two per SM (8 warps while each has its SM to itself, then 4), 16-row
    # tl.dot tiles beyond
    assert [default_config(b, n_sms=h100).block_b for b in (1, 32, 132, 133, 256, 264, 265, 1024)] == \
        [1, 1, 1, 1, 1, 1, 16, 16]
    assert default_config(32, n_sms=h100) == KernelConfig(block_b=1, block_n=64, block_k=64, num_warps=8)
    assert default_config(256, n_sms=h100).num_warps == 4
    assert default_config(265, n_sms=h100, d_model=512) == KernelConfig(block_b=16, block_n=64, block_k=16,
                                                                        num_warps=4)
    assert default_config(100_000, n_sms=h100).block_b == 16
    # tensor cores: one-row programs up to one per SM, then tl.dot tiles, 32 rows (8 warps) past 16 rows per SM,
    # and 8 warps from d_model 128 on
    for weight_dtype, precision in ((torch.bfloat16, "ieee"), (torch.float32, "tf32x3"), (torch.float32, "tf32")):
        assert default_config(132, weight_dtype, precision, n_sms=h100) == default_config(132, n_sms=h100)
        assert default_config(133, weight_dtype, precision, n_sms=h100) == KernelConfig(16, 64, 32, 4)
        assert default_config(133, weight_dtype, precision, n_sms=h100, d_model=128) == KernelConfig(16, 64, 32, 8)
        assert default_config(2112, weight_dtype, precision, n_sms=h100) == KernelConfig(16, 64, 32, 4)
        assert default_config(2113, weight_dtype, precision, n_sms=h100) == KernelConfig(32, 64, 32, 8)


@pytest.mark.parametrize("n_sms", [1, 7, 108, 132])
def test_default_config_rule(n_sms):
    for batch in list(range(1, 300)) + [1000, 5000, 20000]:
        config = default_config(batch, n_sms=n_sms)
        if config.block_b == 1:  # at most MAX_ONE_ROW_PROGRAMS_PER_SM one-row programs on every SM
            assert batch <= MAX_ONE_ROW_PROGRAMS_PER_SM * n_sms, (batch, config)
            assert config.num_warps == (8 if batch <= n_sms else 4), (batch, config)
        else:
            assert batch > MAX_ONE_ROW_PROGRAMS_PER_SM * n_sms and config.block_b == 16, (batch, config)


def test_small_tiles_keep_their_product_in_registers():
    for block_b in SMALL_BLOCK_BS:
        config = small_tile_config(block_b)
        assert config.block_b * config.block_n * config.block_k == SMALL_TILE and config.num_warps == 4
        for size in (config.block_n, config.block_k):
            assert size >= 16 and size & (size - 1) == 0
    with pytest.raises(ValueError, match="block_b must be one of"):
        small_tile_config(16)
    with pytest.raises(ValueError, match="batch and n_sms must be >= 1"):
        default_config(8, n_sms=0)


def test_default_config_asks_the_device():
    assert processor_count(torch.device("cpu")) == 1  # the interpreter runs one program at a time
    assert default_config(5) == default_config(5, n_sms=processor_count(
        torch.device("cuda" if torch.cuda.is_available() else "cpu")))


# -- the kernel under the Triton interpreter ----------------------------------------------------

@pytest.fixture(scope="module")
def interpreter():
    """The kernel module imported interpreted (TRITON_INTERPRET=1 while it is defined), CPU only."""
    return import_interpreted(support.KERNEL_MODULE)


@pytest.mark.parametrize("event", [False, True], ids=["no-dt", "event-dt"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_rollout_equals_the_loop(interpreter, case, event):
    model = make_model(*case)
    context, dt = make_data(event=event)
    out = fused_rollout(model, context, HORIZON, dt, config=DOT_TILE)
    ref = loop_rollout(model, context, HORIZON, dt)
    assert out.shape == (B, HORIZON, W)
    assert relative_error(out[:, 1:], ref[:, 1:]) < FUSED_TOL
    assert relative_error(ref[:, -1], ref[:, 1]) > 1e-2  # the rollout moves: the comparison has teeth


def small_tile_params():
    """Every mixer with every small block_b (the four S5 variants take one block_b each), event dt on every other."""
    s5 = [case for case in CASES if case[0] == "s5"]
    others = [case for case in CASES if case[0] != "s5"]
    params = []
    for index, block_b in enumerate(SMALL_BLOCK_BS):
        for position, case in enumerate(others + [s5[index % len(s5)]]):
            event = (index + position) % 2 == 1
            params.append(pytest.param(case, block_b, event,
                                       id=f"{case_id(case)}-b{block_b}-{'event-dt' if event else 'no-dt'}"))
    return params


@pytest.mark.parametrize("case, block_b, event", small_tile_params())
def test_small_tiles_equal_the_loop(interpreter, case, block_b, event):
    # B=5 rows: one row a program (5 programs) up to 8 rows a program (one program, 3 padded rows)
    model = make_model(*case)
    context, dt = make_data(event=event)
    out = fused_rollout(model, context, HORIZON, dt, config=small_tile_config(block_b))
    ref = loop_rollout(model, context, HORIZON, dt)
    assert relative_error(out[:, 1:], ref[:, 1:]) < FUSED_TOL
    assert relative_error(ref[:, -1], ref[:, 1]) > 1e-2


ONE_ROW = KernelConfig(block_b=1, block_n=16, block_k=16)  # the register kernel for S5 and Mamba, in 16-wide blocks


@pytest.mark.parametrize("config", [None, ONE_ROW], ids=["default", "one-row"])
@pytest.mark.parametrize("case", [("s5", {"discretization": "zoh"}), ("mamba", {}), ("rglru", {})], ids=case_id)
def test_fused_steps_leave_the_loops_final_state(interpreter, case, config):
    # d_model 24: Mamba's 48 channels in three blocks of 16 on one-row programs
    model = make_model(*case, d_model=24)
    context, dt = make_data(event=True)
    with rollout_mode(model, "cpu"):
        y, state = model.prefill(context, dt[:, :C])
        dt_steps = dt[:, C:C + HORIZON - 1]
        ys, final = fused_steps(model, y[:, -1], state, HORIZON - 1, dt_steps, return_state=True, config=config)
        loop_state = clone_state(state)
        ref = run_steps(model, y[:, -1], loop_state, HORIZON - 1, dt_steps)
    assert relative_error(ys, ref) < FUSED_TOL
    assert set(final) == set(loop_state)
    for key, value in loop_state.items():
        assert relative_error(final[key], value) < FUSED_TOL, key
        assert relative_error(final[key], state[key]) > 1e-3, key  # the state did advance
    zero_start = fused_steps(model, y[:, -1], None, 3, config=config)
    with rollout_mode(model, "cpu"):
        ref_zero = run_steps(model, y[:, -1], model.allocate_state(B, "cpu"), 3)
    assert relative_error(zero_start, ref_zero) < FUSED_TOL


def take_an_optimizer_step(model, context, dt) -> None:
    """One Adam step on the context's squared output (large enough to change every rollout), in train mode."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    model(context, dt[:, : context.shape[1]]).square().mean().backward()
    optimizer.step()


def test_fused_rollout_follows_an_optimizer_step(interpreter):
    # S5 bilinear in event mode: the discretisation from the live Lambda and log_step happens in the kernel
    model = make_model("s5", {"discretization": "bilinear"})
    context, dt = make_data(event=True)
    before = fused_rollout(model, context, HORIZON, dt)
    take_an_optimizer_step(model, context, dt)
    after = fused_rollout(model, context, HORIZON, dt)
    assert relative_error(after[:, 1:], loop_rollout(model, context, HORIZON, dt)[:, 1:]) < FUSED_TOL
    assert relative_error(after[:, 1:], before[:, 1:]) > 1e-3


def test_several_programs_and_padded_rows(interpreter):
    # 18 rows = two programs of 16, the second padded with 14 rows that must not leak
    model = make_model("lru", n_layers=1)
    context, dt = make_data(batch=18, event=True)
    out = fused_rollout(model, context, HORIZON, dt, config=DOT_TILE)
    assert relative_error(out[:, 1:], loop_rollout(model, context, HORIZON, dt)[:, 1:]) < FUSED_TOL
    alone = fused_rollout(model, context[16:], HORIZON, dt[16:], config=DOT_TILE)
    assert relative_error(alone, out[16:]) < FUSED_TOL
    default = fused_rollout(model, context, HORIZON, dt)  # the CPU's default: 18 rows on one "SM", tl.dot tiles
    assert relative_error(default, out) < FUSED_TOL


REGISTER_CASES = [case for case in CASES if case[0] not in ("s4d", "rglru")]  # LRU, S5, Mamba


@pytest.mark.parametrize("event", [False, True], ids=["no-dt", "event-dt"])
@pytest.mark.parametrize("case", REGISTER_CASES, ids=case_id)
def test_register_and_scratch_kernels_equal_the_loop(interpreter, case, event):
    # LRU, S5 and Mamba run the register kernel by default on small tiles; the scratch kernel stays for the rest
    model = make_model(*case)
    context, dt = make_data(event=event)
    ref = loop_rollout(model, context, HORIZON, dt)
    for activations in ("registers", "scratch"):
        config = replace(small_tile_config(2), activations=activations)
        out = fused_rollout(model, context, HORIZON, dt, config=config)
        assert relative_error(out[:, 1:], ref[:, 1:]) < FUSED_TOL, activations


def test_register_kernel_over_several_blocks_and_on_tensor_cores(interpreter):
    # 20 modes and 80 hidden units in blocks of 16 (ragged tails, the MLP's prefetch past the end), d_model 40
    model = make_model("s5", {"discretization": "zoh"}, d_model=40, d_state=20)
    context, dt = make_data(batch=20, event=True)
    ref = loop_rollout(model, context, HORIZON, dt)
    small = KernelConfig(block_b=4, block_n=16, block_k=16, activations="registers")
    assert relative_error(fused_rollout(model, context, HORIZON, dt, config=small)[:, 1:], ref[:, 1:]) < FUSED_TOL
    # tl.dot tiles run in registers for the tensor-core precisions (the interpreter computes them in fp32)
    dot = KernelConfig(block_b=16, block_n=16, activations="registers")
    out = fused_rollout(model, context, HORIZON, dt, precision="tf32x3", config=dot)
    assert relative_error(out[:, 1:], ref[:, 1:]) < FUSED_TOL


def test_which_kernel_runs_and_why_not(interpreter):
    lru, rglru = make_model("lru"), make_model("rglru")
    x0 = torch.randn(B, W)
    packed = pack_model(lru, torch.float32, event=False)
    small, dot = small_tile_config(1), KernelConfig(block_b=16)
    assert build_call(packed, x0, None, 2, None, "ieee", small, True).kernel == "register_rollout_kernel"
    assert build_call(packed, x0, None, 2, None, "ieee", dot, True).kernel == "fused_rollout_kernel"
    assert build_call(packed, x0, None, 2, None, "tf32x3", dot, True).kernel == "register_rollout_kernel"
    assert build_call(packed, x0, None, 2, None, "ieee", replace(small, activations="scratch"), True).kernel \
        == "fused_rollout_kernel"
    assert registers_fit(pack_model(rglru, torch.float32, False), small) == (
        False, "it implements LRU, S5 (modal) and Mamba mixers only, not RG-LRU")
    assert registers_fit(pack_model(make_model("mamba"), torch.float32, False), small) == (True, "")
    narrow = replace(small, num_warps=1)
    fits, why = registers_fit(pack_model(make_model("mamba", d_state=80), torch.float32, False), narrow)
    assert not fits and "Mamba's d_state 80 exceeds a 512-element state tile (1 warp)" in why
    fits, why = registers_fit(pack_model(make_model("lru", d_model=128, width=64), torch.float32, False),
                              replace(small, num_warps=8))
    assert not fits and "the encoder / decoder tile (d_model 128 x width 64) exceeds 4096 elements" in why
    # the shapes the GPU tests force onto registers fit: d_model 96-128, width 5, 4 warps, one row or 16 rows
    for d_model in (96, 128):
        packed_gpu = pack_model(make_model("lru", d_model=d_model, width=5), torch.float32, False)
        assert registers_fit(packed_gpu, replace(small, num_warps=4)) == (True, "")
        assert registers_fit(packed_gpu, KernelConfig(block_b=16, block_k=32), "tf32x3") == (True, "")
    fits, why = registers_fit(packed, dot)
    assert not fits and "exact-fp32 tl.dot tiles" in why
    wide = pack_model(make_model("lru", d_model=600, n_layers=1), torch.float32, event=False)
    fits, why = registers_fit(wide, small)
    assert not fits and "d_model 600" in why and "2048-element tile (4 warps)" in why
    with pytest.raises(ValueError, match="activations='registers' cannot run this model: it implements LRU, S5"):
        fused_steps(rglru, x0, None, 2, config=replace(small, activations="registers"))
    with pytest.raises(ValueError, match="activations must be one of .*got 'smem'"):
        fused_steps(lru, x0, None, 2, config=replace(small, activations="smem"))


MODAL_CASES = [case for case in LTI_CASES if case[0] != "s4d"]  # LRU and every S5 variant


@pytest.mark.parametrize("event", [False, True], ids=["no-dt", "event-dt"])
@pytest.mark.parametrize("case", MODAL_CASES, ids=case_id)
def test_one_layer_models_run_resident_and_equal_the_loop(interpreter, case, event):
    # one layer, 4 modes, 16 hidden units: weights and state stay in registers (kernels/resident.py)
    model = make_model(*case, n_layers=1)
    context, dt = make_data(event=event)
    packed = pack_model(model, torch.float32, event=event)
    x0 = torch.randn(B, W)
    ref = loop_rollout(model, context, HORIZON, dt)
    assert relative_error(ref[:, -1], ref[:, 1]) > 1e-2
    # one and two rows a program, and a 16-row tl.dot tile (tensor-core precision; fp32 in the interpreter)
    shapes = [(small_tile_config(1), "ieee"), (small_tile_config(2), "ieee"),
              (KernelConfig(block_b=16, block_n=16), "tf32x3")]
    for config, precision in shapes:
        call = build_call(packed, x0, None, 2, dt[:, :2] if event else None, precision, config, True)
        assert call.kernel == "register_rollout_kernel", config
        assert call.constexprs["RESIDENT"] == (ROW_RESIDENT if config.block_b == 1 else TILE_RESIDENT), config
        out = fused_rollout(model, context, HORIZON, dt, precision=precision, config=config)
        assert relative_error(out[:, 1:], ref[:, 1:]) < FUSED_TOL, config
    # the state the resident steps write back after the last step is the loop's
    with rollout_mode(model, "cpu"):
        y, state = model.prefill(context, dt[:, :C] if event else None)
        dt_steps = dt[:, C:C + HORIZON - 1] if event else None
        ys, final = fused_steps(model, y[:, -1], state, HORIZON - 1, dt_steps, return_state=True,
                                config=small_tile_config(1))
        loop_state = clone_state(state)
        ref_steps = run_steps(model, y[:, -1], loop_state, HORIZON - 1, dt_steps)
    assert relative_error(ys, ref_steps) < FUSED_TOL
    for key, value in loop_state.items():
        assert relative_error(final[key], value) < FUSED_TOL, key
        assert relative_error(final[key], state[key]) > 1e-3, key



def test_one_row_resident_steps_widen_bf16_weights_like_the_tile_path(interpreter):
    # bf16 weights on small tiles are widened to fp32 (activations stay fp32): the one-row vector path
    # (resident_row_steps) and the two-row tile path (resident_modal_steps) compute the same numbers
    model = make_model("s5", {"discretization": "zoh"}, n_layers=1)
    context, dt = make_data(event=True)
    packed = pack_model(model, torch.bfloat16, event=True)
    for rows, path in ((1, ROW_RESIDENT), (2, TILE_RESIDENT)):
        call = build_call(packed, context[:, -1], None, 2, dt[:, :2], "ieee", small_tile_config(rows), True)
        assert call.constexprs["RESIDENT"] == path, rows
    one_row = fused_rollout(model, context, HORIZON, dt, weight_dtype=torch.bfloat16, config=small_tile_config(1))
    two_rows = fused_rollout(model, context, HORIZON, dt, weight_dtype=torch.bfloat16, config=small_tile_config(2))
    fp32 = fused_rollout(model, context, HORIZON, dt, config=small_tile_config(1))
    assert relative_error(one_row[:, 1:], two_rows[:, 1:]) < 1e-5
    assert relative_error(one_row[:, 1:], fp32[:, 1:]) > 1e-4  # the weights were rounded to bf16


@pytest.mark.parametrize("chunk", [REDUCTION_CHUNK, 2 * REDUCTION_CHUNK], ids=["chunk", "chunk-wider-than-a-block"])
@pytest.mark.parametrize("case", [("lru", {}), ("s5", {"discretization": "zoh"})], ids=case_id)
def test_chunked_weight_tiles_sum_what_flat_tiles_do(interpreter, case, chunk):
    # bf16 weights on one-row programs load their tiles chunked (launch.build_call, common.load_tile). d_model 36
    # in 64 columns, 20 states and 72 hidden units in blocks of 16 (the last mode and hidden-unit blocks partly
    # padded): the chunked sums must equal the flat ones; a chunk wider than a 16-wide block is capped at it
    model = make_model(*case, d_model=36, d_state=20)
    context, dt = make_data(event=True)
    packed = pack_model(model, torch.bfloat16, event=True)
    config = replace(small_tile_config(1), block_n=16)
    steps = HORIZON - 1
    chunked, flat = (build_call(packed, context[:, -1], None, steps, dt[:, :steps], "ieee", config, True)
                     for _ in range(2))
    assert chunked.constexprs["CHUNK"] == REDUCTION_CHUNK and chunked.constexprs["RESIDENT"] == 0
    assert chunked.constexprs["BP"] == chunked.constexprs["BF"] == 16 and chunked.constexprs["BD"] == 64
    chunked.constexprs["CHUNK"], flat.constexprs["CHUNK"] = chunk, 0
    chunked.launch(interpreter)
    flat.launch(interpreter)
    assert relative_error(chunked.out[:, 1:], flat.out[:, 1:]) < FUSED_TOL
    assert relative_error(chunked.states, flat.states) < FUSED_TOL
    assert relative_error(flat.out[:, -1], flat.out[:, 1]) > 1e-2  # the rollout moves
    # fp32 weights and tiles of two rows stay flat
    assert packed.d_ff % 16 and packed.sizes[0] % 16  # partial blocks
    # fp32 weights, tiles of two rows and resident one-row launches (which hold their own tiles) stay flat
    fp32 = pack_model(model, torch.float32, event=True)
    two_rows = replace(small_tile_config(2), block_n=16)
    resident = pack_model(make_model(*case, d_model=32, d_state=16, n_layers=1), torch.bfloat16, event=True)
    for weights, shape in ((fp32, config), (packed, two_rows), (resident, small_tile_config(1))):
        call = build_call(weights, context[:, -1], None, steps, dt[:, :steps], "ieee", shape, True)
        assert call.constexprs["CHUNK"] == 0 and (weights is not resident or call.constexprs["RESIDENT"])


@pytest.mark.parametrize("chunk", [0, 4, 16, 64], ids=["flat", "chunks-of-4", "chunks-of-16", "chunk-over-the-tile"])
def test_load_tile_reads_the_rows_and_columns_it_is_given(interpreter, chunk):
    # a 7 x 13 window (rows 2..8, columns 3..15) of a matrix NaN around it, into a tile of 16 rows (7 and on
    # masked) and 16 columns (13 and on masked): a read outside the window would show as NaN, a misplaced one
    # as a wrong value
    probe = import_interpreted("tests.tile_probe")
    matrix = torch.full((12, 20), float("nan"))
    matrix[2:9, 3:16] = torch.randn(7, 13)
    window = matrix.flatten()[2 * 20 + 3:]  # row 2, column 3 on; rows 20 apart
    out = torch.full((16, 16), -1.0)
    probe.store_tile[(1,)](window, 20, 7, 13, out, 16, 16, chunk)
    expected = torch.zeros(16, 16)
    expected[:7, :13] = matrix[2:9, 3:16]
    assert torch.equal(out, expected)


@pytest.mark.parametrize("case", [("lru", {}), ("s5", {"discretization": "bilinear"})], ids=case_id)
def test_one_row_resident_steps_mask_padded_columns(interpreter, case):
    # one input feature (16 columns of which 15 are padding), d_model 12 in 16 columns, 24 hidden units in 32,
    # 6 states (LRU 6 modes, S5 3 conjugate pairs) in 16: every padded element must stay out of the sums
    model = make_model(*case, d_model=12, d_state=6, n_layers=1, width=1)
    context, dt = torch.randn(B, C, 1), random_dt(B, C + HORIZON)
    packed = pack_model(model, torch.float32, event=True)
    call = build_call(packed, context[:, -1], None, 2, dt[:, :2], "ieee", small_tile_config(1), True)
    assert call.constexprs["RESIDENT"] == ROW_RESIDENT and (call.constexprs["BF"], packed.d_ff) == (32, 24)
    out = fused_rollout(model, context, HORIZON, dt, config=small_tile_config(1))
    ref = loop_rollout(model, context, HORIZON, dt)
    assert relative_error(out[:, 1:], ref[:, 1:]) < FUSED_TOL
    assert relative_error(ref[:, -1], ref[:, 1]) > 1e-2

def test_which_models_run_resident(interpreter):
    x0 = torch.randn(B, W)
    one_row = small_tile_config(1)

    def resident(model, config=one_row, precision="ieee"):
        call = build_call(pack_model(model, torch.float32, False), x0, None, 2, None, precision, config, True)
        return call.kernel == "register_rollout_kernel" and call.constexprs["RESIDENT"]
    assert resident(make_model("lru", n_layers=1))
    assert resident(make_model("lru", n_layers=1), KernelConfig(block_b=16, block_n=16), "tf32x3")
    assert not resident(make_model("lru", n_layers=2))  # the layers' weights would not all fit
    assert not resident(make_model("mamba", n_layers=1))  # modal mixers only
    # 40 modes in blocks of 16: more than one block of modes
    assert not resident(make_model("lru", n_layers=1, d_state=40), replace(one_row, block_n=16))
    # one block each (32 modes, 64 units), but (4 x 32 + 3 x 64) x d_model 32 elements exceed 4 tiles of 4 warps
    wide = make_model("lru", n_layers=1, d_model=32, d_state=32)
    assert resident(wide, replace(one_row, num_warps=8)) and not resident(wide, replace(one_row, num_warps=4))


def test_default_launch_refines_the_batch_rule_with_the_model():
    h100 = 132

    def packed(name, d_model, d_state, n_layers, dtype=torch.float32):
        return pack_model(make_model(name, d_model=d_model, d_state=d_state, n_layers=n_layers), dtype, event=False)
    small_lru = packed("lru", 32, 16, 1)
    # a one-layer model that runs resident takes RESIDENT_WARPS warps; others keep the batch rule's shape
    assert default_launch(small_lru, 32, torch.float32, "ieee", h100) == replace(default_config(32, n_sms=h100),
                                                                                 num_warps=RESIDENT_WARPS)
    lru = packed("lru", 128, 64, 4)
    assert default_launch(lru, 32, torch.float32, "ieee", h100) == default_config(32, n_sms=h100, d_model=128)
    # tensor-core tl.dot tiles in registers split where MIN_DOT_SPLIT programs a tile fit, with 4 warps
    lru_bf16 = packed("lru", 128, 64, 4, torch.bfloat16)
    for batch, split in ((256, 8), (512, 4)):
        config = default_launch(lru_bf16, batch, torch.bfloat16, "ieee", h100)
        assert (config.block_b, config.split, config.num_warps) == (16, split, DOT_SPLIT_WARPS), batch
    # past 4 rows per SM (33 tiles and more), where no split of MIN_DOT_SPLIT fits, phased steps (split 2 was no faster)
    assert default_launch(lru_bf16, 4 * h100 + 1, torch.bfloat16, "ieee", h100).activations == "phased"
    assert default_launch(lru, 512, torch.float32, "tf32x3", h100).split == 4
    # Mamba's 16-row state tiles do not fit the register kernel: one-row programs up to two rows per SM
    mamba_bf16 = packed("mamba", 128, 64, 4, torch.bfloat16)
    assert not registers_fit(mamba_bf16, default_config(256, torch.bfloat16, n_sms=h100, d_model=128))[0]
    assert default_launch(mamba_bf16, 256, torch.bfloat16, "ieee", h100) == replace(small_tile_config(1),
                                                                                    num_warps=4)
    assert default_launch(mamba_bf16, 512, torch.bfloat16, "ieee", h100).block_b == 16  # 4 rows per SM
    # a width of 32 does not fit the encoder tile in 4 warps' registers: the split keeps the 8 warps, and
    # the launch builds for 132 SMs
    wide_io = pack_model(make_model("lru", d_model=128, d_state=64, n_layers=4, width=32), torch.bfloat16, False)
    config = default_launch(wide_io, 256, torch.bfloat16, "ieee", h100)
    assert (config.block_b, config.split, config.num_warps) == (16, 8, 8)
    call = build_call(wide_io, torch.randn(256, 32), None, 2, None, "ieee", config, interpreted=False, n_sms=h100)
    assert call.kernel == "register_rollout_kernel" and call.constexprs["SPLIT"] == 8
    # exact fp32 keeps the batch rule up to two rows per SM (one-row programs), then takes phased steps at this width
    assert default_launch(lru, 256, torch.float32, "ieee", h100) == default_config(256, n_sms=h100, d_model=128)
    assert default_launch(lru, 1024, torch.float32, "ieee", h100).activations == "phased"


def test_default_split_rule():
    # one-row tiles on 132 SMs: as many programs a tile as stay resident together, up to MAX_SPLIT
    assert [default_split(tiles, 132, blocks=16) for tiles in (1, 16, 17, 32, 33, 34, 66, 67, 132)] == \
        [MAX_SPLIT, 8, 4, 4, 4, 2, 2, 1, 1]
    assert default_split(1, 132, blocks=2) == 2  # no program without a block of its own
    assert default_split(1, 1, blocks=16) == 1


@pytest.mark.parametrize("name, d_model, d_state, n_layers, width, block_b, pays", [
    ("lru", 32, 16, 4, W, 1, False),     # 34 KB a layer: the exchanges cost more than the streaming they share
    ("lru", 32, 256, 1, W, 1, False),    # 150 KB, but at d_model 32 only the 384 KB rule was measured
    ("lru", 48, 24, 4, W, 1, True),      # 75 KB a layer
    ("s5", 64, 32, 1, W, 1, True),
    ("lru", 64, 32, 2, W, 2, False),     # two-row tiles keep the 384 KB rule
    ("lru", 32, 64, 1, 32, 1, False),    # 67 KB, but its weights stay in registers unsplit (resident)
    ("mamba", 64, 32, 2, W, 1, True),    # counter exchanges: 384 KB in all
    ("mamba", 32, 16, 4, W, 1, False),
])
def test_a_step_is_split_only_where_its_weights_pay_for_the_exchanges(name, d_model, d_state, n_layers, width,
                                                                        block_b, pays):
    packed = pack_model(make_model(name, d_model=d_model, d_state=d_state, n_layers=n_layers, width=width),
                        torch.float32, False)
    config = replace(small_tile_config(block_b), num_warps=8)
    assert split_pays(packed, config) == pays
    call = build_call(packed, torch.randn(32, width), None, 2, None, "ieee", config, interpreted=False, n_sms=132)
    assert call.constexprs["SPLIT"] == ((4 if block_b == 1 else 8) if pays else 1)


def test_a_model_resident_on_eight_warps_is_not_split_on_four():
    packed = pack_model(make_model("lru", d_model=32, d_state=64, n_layers=1, width=32), torch.float32, False)
    config = default_launch(packed, 32, torch.float32, "ieee", 132)
    call = build_call(packed, torch.randn(32, 32), None, 2, None, "ieee", config, interpreted=False, n_sms=132)
    assert (config.num_warps, call.constexprs["SPLIT"], call.constexprs["RESIDENT"]) == (8, 1, ROW_RESIDENT)


def test_narrow_split_one_row_steps_take_fewer_warps():
    h100 = 132
    for d_model, d_state, n_layers, batch, expected in ((64, 32, 2, 32, (NARROW_SPLIT_WARPS, 4)),
                                                         (48, 24, 4, 16, (NARROW_SPLIT_WARPS, 4)),
                                                         (64, 32, 2, 8, (NARROW_SPLIT_WARPS, 8)),
                                                         (32, 16, 4, 32, (ONE_ROW_WARPS, 1)),  # not worth a split
                                                         (128, 64, 4, 32, (ONE_ROW_WARPS, 4))):  # wide: 8 warps
        packed = pack_model(make_model("lru", d_model=d_model, d_state=d_state, n_layers=n_layers), torch.float32,
                            event=False)
        config = default_launch(packed, batch, torch.float32, "ieee", h100)
        call = build_call(packed, torch.randn(batch, W), None, 2, None, "ieee", config, interpreted=False, n_sms=h100)
        assert (config.num_warps, call.constexprs["SPLIT"]) == expected, (d_model, n_layers, batch)
        assert call.constexprs["TAGGED"] or expected[1] == 1  # the measured gain was with tagged exchanges


def test_split_steps_choice_and_errors(interpreter, monkeypatch):
    model = make_model("lru", d_model=128, d_state=64, n_layers=2)  # 64 modes, 256 hidden units
    packed = pack_model(model, torch.float32, event=False)
    assert weight_bytes(packed) >= SPLIT_MIN_WEIGHT_BYTES
    x0 = torch.randn(B, W)
    one_row = replace(small_tile_config(1), num_warps=8)  # default_config's one-row programs on an H100
    # the interpreter runs one program at a time: no split unless asked, and asking is an error
    call = build_call(packed, x0, None, 2, None, "ieee", one_row, True)
    assert call.grid == (B,) and call.constexprs["SPLIT"] == 1 and not call.cooperative
    with pytest.raises(ValueError, match="split=2 needs a GPU.*the Triton interpreter runs one program at a time"):
        build_call(packed, x0, None, 2, None, "ieee", replace(one_row, split=2), True)
    # on a (pretend) 132-SM GPU: B=5 one-row tiles split 8 ways by default, blocks shrunk so every rank has some
    monkeypatch.setattr(launch, "processor_count", lambda device: 132)
    call = build_call(packed, x0, None, 2, None, "ieee", one_row, False)
    assert call.grid == (B * MAX_SPLIT,) and call.cooperative and call.constexprs["SPLIT"] == MAX_SPLIT
    assert call.constexprs["BP"] == 16 and call.constexprs["BF"] == 32  # 64 modes, 256 units over 8 ranks
    call = build_call(packed, x0, None, 2, None, "ieee", replace(one_row, split=2), False)
    assert call.grid == (2 * B,) and call.constexprs["BP"] == 32
    with pytest.raises(ValueError, match=r"split=8 x 20 row tiles = 160 programs, more than the 132 SMs"):
        build_call(packed, torch.randn(20, W), None, 2, None, "ieee", replace(one_row, split=8), False)
    # unsplit launches need no co-residency: any number of row tiles; tl.dot tiles are not split by default
    assert build_call(packed, torch.randn(200, W), None, 2, None, "ieee", replace(one_row, split=1),
                      False).grid == (200,)
    dot = build_call(packed, x0, None, 2, None, "tf32x3", KernelConfig(block_b=16, block_k=32), False)
    assert dot.kernel == "register_rollout_kernel" and dot.constexprs["SPLIT"] == 1 and dot.grid == (1,)
    with pytest.raises(ValueError, match="split=2 splits the register kernel's steps, but this launch takes the "
                                         "scratch kernel"):
        build_call(packed, x0, None, 2, None, "ieee", replace(one_row, split=2, activations="scratch"), False)
    for bad in (0, MAX_SPLIT + 1, 2.0):
        with pytest.raises(ValueError, match=f"split must be None or an int from 1 to {MAX_SPLIT}, got {bad!r}"):
            fused_steps(model, x0, None, 2, config=replace(one_row, split=bad))
    # a small model's step is not split
    tiny = pack_model(make_model("lru"), torch.float32, event=False)
    assert build_call(tiny, x0, None, 2, None, "ieee", one_row, False).constexprs["SPLIT"] == 1


def test_split_steps_exchange_protocol(interpreter, monkeypatch):
    """LRU / S5 one-row split steps exchange tagged words, Mamba and row tiles the counter (kernels/group.py);
    either way the launch zeroes the slots (tag 0 is never expected) and the counters."""
    from lrnn_lightning.rollout.fused.kernels.group import MAX_RANKS, _gather_asm
    from lrnn_lightning.rollout.fused.pack import MAMBA, MODAL

    assert MAX_RANKS == MAX_SPLIT  # gather_tagged polls every rank of the widest split at once
    assert tagged_exchange(MODAL, 1, 128, 4) and tagged_exchange(MODAL, 1, 256, 8)
    assert not tagged_exchange(MODAL, 1, 256, 4)  # two values a thread: waited for one after the other
    assert not tagged_exchange(MODAL, 16, 128, 8) and not tagged_exchange(MAMBA, 1, 128, 8)
    monkeypatch.setattr(launch, "processor_count", lambda device: 132)
    one_row = replace(small_tile_config(1), num_warps=8, split=4)
    x0 = torch.randn(B, W)
    seen = []

    class Kernels:  # records what the kernel would find in the exchange buffers
        class register_rollout_kernel:
            def __class_getitem__(cls, grid):
                return lambda *args, **options: seen.append((args[9].clone(), args[10].clone(), options))

    for name, tagged in (("lru", True), ("s5", True), ("mamba", False)):
        packed = pack_model(make_model(name, d_model=128, d_state=64, n_layers=2), torch.float32, event=False)
        call = build_call(packed, x0, None, 2, None, "ieee", one_row, False)
        part, sem = call.args[9], call.args[10]
        assert call.constexprs["TAGGED"] is tagged, name
        assert part.dtype == torch.int64 and part.numel() == B * 2 * 4 * call.constexprs["BX"], name
        assert sem.dtype == torch.int32 and sem.numel() == B and call.zeroed == (part, sem), name
        for _ in range(2):  # what a launch leaves behind, the next finds zeroed: tags restart at every launch
            part.fill_(7 << 32)
            sem.fill_(-5)
            call.launch(Kernels)
            assert not seen[-1][0].any() and not seen[-1][1].any() and seen[-1][2]["launch_cooperative_grid"], name
    unsplit = build_call(packed, x0, None, 2, None, "ieee", replace(one_row, split=1), False)
    assert unsplit.zeroed == () and unsplit.constexprs["SPLIT"] == 1
    lru = pack_model(make_model("lru", d_model=128, d_state=64, n_layers=2), torch.float32, event=False)
    dot = build_call(lru, torch.randn(64, W), None, 2, None, "tf32x3", KernelConfig(block_b=16, block_k=32, split=2),
                     False)
    assert dot.constexprs["SPLIT"] == 2 and dot.constexprs["TAGGED"] is False
    # the poll's operands: ranks outputs, then ranks addresses, then the tag; every stale word is re-read
    asm = _gather_asm(4)
    assert asm.count("ld.relaxed.gpu.global.b64") == 8 and "[$7]" in asm and "$8;" in asm and "$9" not in asm


@pytest.mark.slow
@pytest.mark.parametrize("block_b", [16, 4], ids=["dot", "small"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_multi_block_features(interpreter, case, block_b):
    # widths above the 16-wide blocks exercise every N and K loop, with ragged tails
    model = make_model(*case, d_model=40, d_state=20)
    context, dt = make_data(batch=20, event=True)
    out = fused_rollout(model, context, HORIZON, dt, config=KernelConfig(block_b=block_b, block_n=16, block_k=16))
    assert relative_error(out[:, 1:], loop_rollout(model, context, HORIZON, dt)[:, 1:]) < FUSED_TOL


@pytest.mark.parametrize("activations", ["registers", "scratch"])
@pytest.mark.parametrize("block_b", [16, 2], ids=["dot", "small"])
def test_bf16_weights_stay_close_to_the_fp32_loop(interpreter, block_b, activations):
    # tl.dot tiles round the activations to bf16 too (tensor cores); small tiles widen the bf16 weights to fp32
    model = make_model("s5")
    context, _ = make_data()
    config = KernelConfig(block_b=16) if block_b == 16 else small_tile_config(block_b)
    config = replace(config, activations=activations)
    out = fused_rollout(model, context, HORIZON, weight_dtype=torch.bfloat16, config=config)
    ref = loop_rollout(model, context, HORIZON)
    error = relative_error(out[:, 1:], ref[:, 1:])
    assert 1e-5 < error < BF16_TOL  # rounded, but close


def test_horizon_one_needs_no_kernel(interpreter):
    model = make_model("lru")
    context, _ = make_data()
    out = fused_rollout(model, context, 1)
    with rollout_mode(model, "cpu"):
        assert torch.equal(out[:, 0], model(context)[:, -1])
    assert fused_steps(model, context[:, -1], None, 0).shape == (B, 0, W)


def test_fused_argument_errors(interpreter):
    model = make_model("lru")
    context, dt = make_data(event=True)
    with pytest.raises(ValueError, match="precision must be one of"):
        fused_rollout(model, context, HORIZON, precision="fp64")
    with pytest.raises(ValueError, match="block_b must be one of"):
        fused_rollout(model, context, HORIZON, config=KernelConfig(block_b=12))
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        fused_rollout(model, context, HORIZON, config=KernelConfig(block_k=24))
    with pytest.raises(ValueError, match="expected dt of shape"):
        fused_rollout(model, context, HORIZON, dt[:, :-1])
    with pytest.raises(ValueError, match="TinyMixer is not covered.*HINT"):
        fused_steps(make_model(TinyMixer), context[:, -1], None, 2)


# -- compiling for an H100 on the host ---------------------------------------------------------

@pytest.mark.slow
def test_kernel_compiles_for_sm90():
    """Triton's front end and ptxas run on the host: every mixer's kernel must compile for sm_90 and fit,
    with tl.dot tiles and with small tiles."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from lrnn_lightning.rollout.fused import KernelConfig
        from lrnn_lightning.rollout.fused.aot import compile_for_target
        from lrnn_lightning.rollout.fused.config import small_tile_config
        from tests.test_fused import CASES, make_model
        for index, (name, kwargs) in enumerate(CASES):
            small = small_tile_config((1, 8)[index % 2])
            for event, weight_dtype, precision, config in ((True, torch.float32, "ieee", KernelConfig()),
                                                           (False, torch.bfloat16, "ieee", KernelConfig()),
                                                           (index % 2 == 0, (torch.float32, torch.bfloat16)[index % 2],
                                                            "ieee", small)):
                info = compile_for_target(make_model(name, kwargs, d_model=96, d_state=24), event=event,
                                          weight_dtype=weight_dtype, precision=precision, config=config)
                assert info.fits, (name, kwargs, config, info)
        # a split launch and a resident one, for an H100's 132 SMs (no GPU here to ask)
        split = compile_for_target(make_model("lru", d_model=128, d_state=64), config=KernelConfig(
            block_b=1, block_n=64, block_k=64, num_warps=8, split=8), batch=16)
        assert split.constexprs["SPLIT"] == 8 and split.fits, split
        # Mamba's three-part selection exchange, over a split that is not a power of two
        mamba = compile_for_target(make_model("mamba", d_model=64, d_state=16), event=True, config=KernelConfig(
            block_b=1, block_n=64, block_k=64, num_warps=8, split=3), batch=8)
        assert mamba.constexprs["SPLIT"] == 3 and mamba.fits, mamba
        resident = compile_for_target(make_model("s5", {"discretization": "zoh"}, d_model=32, d_state=16, n_layers=1),
                                      event=True, config=small_tile_config(1), batch=32)
        assert resident.constexprs["RESIDENT"] and resident.fits, resident
        # bf16 one-row tiles load chunked (common.load_tile), split and with a partial MLP block (72 units)
        chunked = compile_for_target(make_model("lru", d_model=36, d_state=20), event=True,
                                     weight_dtype=torch.bfloat16, config=KernelConfig(
                                         block_b=1, block_n=64, block_k=64, num_warps=8, split=4), batch=16)
        assert chunked.constexprs["CHUNK"] > 0 and chunked.fits, chunked
        # phased steps (kernels/phased.py) with their default shapes: 16 row tiles x 8 blocks of 128 hidden units
        # (the widest phase) = 128 programs, within an H100's 132 SMs
        from lrnn_lightning.rollout.fused.config import phased_config
        for weight_dtype, precision in ((torch.bfloat16, "ieee"), (torch.float32, "tf32x3")):
            phased = compile_for_target(make_model("s5", {"discretization": "zoh"}, d_model=512, d_state=32),
                                        event=True, weight_dtype=weight_dtype, precision=precision,
                                        config=phased_config(weight_dtype), batch=1024)
            assert phased.constexprs["NPROG"] == 128 and phased.fits, phased
            assert phased.constexprs["FOLD"] == (weight_dtype == torch.bfloat16)  # the folded products (fold.py)
        print("compiled", len(CASES) * 3 + 6)
    """)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"compiled {len(CASES) * 3 + 6}" in result.stdout


def test_the_one_row_resident_step_keeps_vectors_in_one_layout():
    """Compiled for sm_90 on the host: the one-row resident step loop converts no register layout but its output
    store's, and with event dt under ZOH the two results of its complex division. Each conversion there is a
    shared-memory round trip every step; (1, N) tiles had 34 (RESULTS.md)."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        from lrnn_lightning.rollout.fused.aot import compile_for_target, loop_conversions
        from lrnn_lightning.rollout.fused.config import small_tile_config
        from lrnn_lightning.rollout.fused.launch import ROW_RESIDENT
        from tests.test_fused import make_model
        for name, kwargs in (("lru", {}), ("s5", {"discretization": "zoh"})):
            for event in (False, True):
                model = make_model(name, kwargs, d_model=32, d_state=16, n_layers=1, width=8)
                info = compile_for_target(model, config=small_tile_config(1), batch=32, event=event)
                assert info.constexprs["RESIDENT"] == ROW_RESIDENT, info
                print(name, event, loop_conversions(info.ttgir))
    """)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    for expected in ("lru False [1]", "lru True [1]", "s5 False [1]", "s5 True [3]"):
        assert expected in result.stdout, result.stdout
