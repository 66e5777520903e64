#!/usr/bin/env python3
"""How much of a buffer one kernel writes does the next kernel read from L2, by size.

The cost model (BENCHMARKS.md, "Cost model") counts every launch's distinct bytes as DRAM traffic,
so the two-stage intermediate Z (37.7 MB per expert at T5-base in bf16, written by the rows kernel
and read by the columns kernel right after) costs a DRAM write and a DRAM read. On a GPU with
tens of MB of L2 part of that read may hit. This measures it without the crate: per size, one
kernel writes a buffer (fill_), the next reads it (sum), and the read is timed with CUDA events;
"cold" times the same read after a 1 GiB write in between has evicted the buffer. A warm read much
faster than the cold one means the next launch found the data in L2.

Prints one line per size:
  l2_reuse mb=... cold_us=... warm_us=... cold_gbps=... warm_gbps=... warm_over_cold=...
and a `machine ...` line (device, L2 size from the driver). Median of --reps reads each.

Usage: python3 scripts/l2_reuse.py [--sizes 8,16,24,32,38,48,64,96] [--reps 15]
Not run on a GPU yet: its numbers are unmeasured until scripts/gpu-check.sh runs it on one.
"""

import argparse
import statistics


def main():
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="8,16,24,32,38,48,64,96", help="buffer sizes in MB (10^6 bytes)")
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("l2_reuse: no CUDA device")
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 0)
    print(f"machine device={props.name.replace(' ', '_')} l2_mb={l2 / 1e6:.1f} sms={props.multi_processor_count}")
    evict = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    out = torch.empty((), dtype=torch.float32, device=dev)

    def timed_read(buf, cold):
        times = []
        for _ in range(args.reps + 2):
            buf.fill_(1.0)  # the producer: every byte written, as the rows kernel writes Z
            if cold:
                evict.fill_(0)  # a 1 GiB write in between leaves none of buf in L2
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.sum(buf, dim=0, dtype=torch.float32, out=out)  # the consumer: every byte read once
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return statistics.median(times[2:])

    for mb in [float(s) for s in args.sizes.split(",") if s]:
        buf = torch.empty(int(mb * 1e6) // 2, dtype=torch.bfloat16, device=dev)
        cold, warm = timed_read(buf, True), timed_read(buf, False)
        nbytes = buf.numel() * 2
        print(
            f"l2_reuse mb={mb:g} cold_us={cold:.2f} warm_us={warm:.2f} cold_gbps={nbytes / cold / 1e3:.0f} "
            f"warm_gbps={nbytes / warm / 1e3:.0f} warm_over_cold={warm / cold:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
