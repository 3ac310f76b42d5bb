"""What a split step's exchange and a program's weight streaming cost on this GPU, measured alone.

The fused kernel's split steps (lrnn_lightning/rollout/fused/kernels/group.py) exchange
partial sums between the programs of a row tile at every layer; a program that does not
split streams all of its weights from L2 at every step. This probe times both on their own,
so the kernel's step time can be broken down (RESULTS.md):

    tagged     µs per exchange of group.py's tagged protocol (values in 64-bit words tagged with
               the exchange, polled until the tag shows) for groups of SPLIT programs (as many
               groups as fit the SMs, SPLIT <= 8), for (rows, width) partials
    counter    the same with group.py's counter barrier (a release atomic on a per-group
               counter, an acquire poll, then the loads of the data)
    relaxed    the counter barrier with a relaxed poll and an explicit fence.acq_rel.gpu
    stream     GB/s one program pulls from L2 (or L1) when P programs stream the same weight-sized buffer

Every exchanged sum is checked against its expected value (a wrong sum is reported).

    python experiments/probe_exchange.py --out probe.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import triton
import triton.language as tl

from lrnn_lightning.rollout.fused.kernels.group import (
    MAX_RANKS,
    exchange_slot,
    gather,
    gather_tagged,
    group_barrier,
    publish,
    publish_tagged,
)

PROTOCOLS = ("tagged", "counter", "relaxed")


@triton.jit
def relaxed_barrier(sem, rank, SPLIT: tl.constexpr):
    """group_barrier with a relaxed poll and one fence.acq_rel.gpu after it (the acquire pattern of PTX)."""
    tl.debug_barrier()
    arrive = tl.where(rank == 0, 2147483647 - (SPLIT - 2), 1)
    before = tl.atomic_add(sem, arrive, sem="release", scope="gpu")
    flipped = False
    while not flipped:
        now = tl.inline_asm_elementwise("ld.relaxed.gpu.global.b32 $0, [$1];", "=r,l", [sem], dtype=tl.int32,
                                        is_pure=False, pack=1)
        flipped = (before ^ now) < 0
    tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False,
                              pack=1)
    tl.debug_barrier()


@triton.jit
def exchange_probe_kernel(part_ptr, words_ptr, sem_ptr, err_ptr, n_iter, SPLIT: tl.constexpr, BB: tl.constexpr,
                          BD: tl.constexpr, PROTOCOL: tl.constexpr):
    pid = tl.program_id(0)
    group = pid // SPLIT
    rank = pid % SPLIT
    part = part_ptr + group.to(tl.int64) * (2 * SPLIT * BB * BD)
    words = words_ptr + group.to(tl.int64) * (2 * SPLIT * BB * BD)
    sem = sem_ptr + group
    r = tl.arange(0, BB)[:, None]
    c = tl.arange(0, BD)[None, :]
    err = tl.full((BB, BD), 0.0, tl.float32)
    carry = tl.full((BB, BD), 0.0, tl.float32)
    for i in range(n_iter):
        # rank's value depends on the last sum, so every exchange waits for the one before
        x = carry + (rank + 1).to(tl.float32) + (r * BD + c).to(tl.float32) * 1e-3
        if PROTOCOL == 0:
            slot = exchange_slot(words, i, SPLIT, True, BB, BD)
            publish_tagged(x, slot, rank, 0, i + 1, BB, BD, BD)
            total = gather_tagged(slot, 0, i + 1, SPLIT, BB, BD, BD)
        else:
            slot = part + (i & 1) * (SPLIT * BB * BD)
            publish(x, slot, rank, 0, BB, BD, BD)
            if PROTOCOL == 1:
                group_barrier(sem, rank, SPLIT)
            else:
                relaxed_barrier(sem, rank, SPLIT)
            total = gather(slot, 0, SPLIT, BB, BD, BD)
        expected = SPLIT * (carry + (r * BD + c).to(tl.float32) * 1e-3) + SPLIT * (SPLIT + 1) / 2
        err = tl.maximum(err, tl.abs(total - expected))
        carry = (total - expected) + (i % 3).to(tl.float32)
    tl.store(err_ptr + pid * (BB * BD) + r * BD + c, err)


@triton.jit
def stream_probe_kernel(w_ptr, out_ptr, n_floats, n_iter, BLOCK: tl.constexpr):
    """Every program sums the same n_floats weights n_iter times, as every program of the fused kernel streams
    the same weights at every step."""
    pid = tl.program_id(0)
    acc = tl.full((BLOCK,), 0.0, tl.float32)
    for _ in range(n_iter):
        for k in range(0, n_floats, BLOCK):
            acc += tl.load(w_ptr + k + tl.arange(0, BLOCK))
    tl.store(out_ptr + pid * BLOCK + tl.arange(0, BLOCK), acc)


def time_ms(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def probe_exchange(split: int, rows: int, width: int, protocol: str, n_sms: int, n_iter: int) -> dict:
    groups = max(1, n_sms // split)
    device = torch.device("cuda")
    size = groups * 2 * split * rows * width
    part = torch.empty(size, device=device)
    words = torch.zeros(size, device=device, dtype=torch.int64)
    sem = torch.zeros(groups, device=device, dtype=torch.int32)
    err = torch.empty(groups * split, rows, width, device=device)

    def run(iters=n_iter):
        words.zero_()  # tags restart at 1 every launch, as in the kernel
        exchange_probe_kernel[(groups * split,)](part, words, sem, err, iters, SPLIT=split, BB=rows, BD=width,
                                                 PROTOCOL=PROTOCOLS.index(protocol), num_warps=8,
                                                 launch_cooperative_grid=True)
    short = time_ms(lambda: run(8))
    full = time_ms(run)
    us = 1e3 * (full - short) / (n_iter - 8)
    return {"probe": protocol, "split": split, "groups": groups, "rows": rows, "width": width,
            "us_per_exchange": us, "max_error": float(err.max().item())}


def probe_stream(programs: int, kbytes: int, n_iter: int = 50) -> dict:
    device = torch.device("cuda")
    n_floats = kbytes * 256
    w = torch.randn(n_floats, device=device)
    out = torch.empty(programs * 1024, device=device)

    def run(iters=n_iter):
        stream_probe_kernel[(programs,)](w, out, n_floats, iters, BLOCK=1024, num_warps=8)
    us = 1e3 * (time_ms(run) - time_ms(lambda: run(5))) / (n_iter - 5)
    return {"probe": "stream", "programs": programs, "KB_per_program": kbytes, "shared_buffer": True,
            "us_per_pass": us, "GBps_per_program": kbytes * 1024 / (us * 1e3),
            "GBps_total": programs * kbytes * 1024 / (us * 1e3)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", default="2,4,8,16,32,64,128")
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help=f"comma-separated subset of {PROTOCOLS}")
    parser.add_argument("--no-stream", action="store_true", help="skip the streaming probe")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this probe needs a CUDA GPU")
    n_sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"device: {torch.cuda.get_device_name()}, {n_sms} SMs, triton {triton.__version__}", flush=True)
    rows = []

    def record(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
    for split in [int(s) for s in args.splits.split(",")]:
        for batch_rows, width in ((1, 16), (1, 128), (16, 128), (32, 128)):
            for protocol in args.protocols.split(","):
                if (protocol == "relaxed" and (batch_rows, width) != (1, 16)) or (protocol == "tagged"
                                                                                   and split > MAX_RANKS):
                    continue
                try:
                    record(probe_exchange(split, batch_rows, width, protocol, n_sms, args.iters))
                except Exception as error:  # noqa: BLE001 (a shape may not fit; the others still run)
                    record({"probe": protocol, "split": split, "rows": batch_rows, "error": str(error)[:300]})
    if not args.no_stream:
        for programs in (1, 8, 32, 128, 132):
            for kbytes in (64, 512, 2048):
                record(probe_stream(programs, kbytes))
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
