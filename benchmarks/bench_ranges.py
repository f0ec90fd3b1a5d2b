"""Frame ranges (issue 3): vectorised ``expand_ranges`` vs a per-row loop.

Builds a 1M-snip partition (20,000 embryos x 50 frames, ~10% of frames
missing, 60% of embryos dead) and 20,000 assignment rows with mixed specs,
then times, side by side in one run:

- ``expand_ranges(part, rows)``: the vectorised core (best of ``--repeat``);
- a Python loop calling ``select_positions`` once per row (best of
  ``--loop-repeat``). Like ``expand_ranges``, the loop is a function of
  ``(part, rows)``: it builds its per-embryo lookups (block start, length,
  death frame) inside the timed region, as cheaply as pandas allows.

The two are interleaved (one loop run between vectorised runs, while loop
runs remain), so that both see the same load on a shared machine; the ratio of
the two best times is the figure to read. Both produce the same (row, pos)
pairs; the script checks that, then prints the timings, the ratio and the
load average.

    /work/venv/bin/python benchmarks/bench_ranges.py
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import pandas as pd

from pipeline.ranges import expand_ranges, parse_range, select_positions


def build_part(rng: np.random.Generator, n_embryos: int, n_frames: int) -> pd.DataFrame:
    # Frames advance by 1, or by 2 about one time in ten: gaps in every embryo.
    gaps = 1 + (rng.random((n_embryos, n_frames)) < 0.1)
    frames = np.cumsum(gaps, axis=1) - 1
    embryo_ids = np.array(
        [f"20240411_A{e // 1000:02d}_e{e % 1000:03d}" for e in range(n_embryos)],
        dtype=object,
    )
    dead = rng.random(n_embryos) < 0.6
    death_at = rng.integers(0, n_frames, size=n_embryos)
    death_frame = pd.array(
        np.where(dead, frames[np.arange(n_embryos), death_at], 0), dtype="Int64"
    )
    death_frame[~dead] = pd.NA
    flat_frames = frames.ravel()
    owner = np.repeat(embryo_ids, n_frames)
    snip_ids = [
        f"{e}_s{f:04d}"
        for e, f in zip(owner.tolist(), flat_frames.tolist(), strict=True)
    ]
    return pd.DataFrame(
        {
            "embryo_id": pd.array(owner, dtype="str"),
            "frame": flat_frames.astype(np.int64),
            "frame_index": np.tile(np.arange(n_frames, dtype=np.int64), n_embryos),
            "n_frames": np.full(n_embryos * n_frames, n_frames, dtype=np.int64),
            "death_frame": np.repeat(death_frame, n_frames),
        },
        index=pd.Index(snip_ids, name="snip_id", dtype="str"),
    )


def random_spec(
    rng: np.random.Generator, part: pd.DataFrame, start: int, n: int, diverse: bool
) -> str | list[str]:
    """One spec of a random kind, as a user would type it."""
    if diverse:
        a, b = sorted(int(x) for x in rng.integers(-5, n + 5, size=2))
    else:
        # People type round numbers: bounds from a pool of 13 values.
        a, b = sorted(int(x) for x in rng.choice(np.arange(-10, n + 15, 5), size=2))
    k = int(rng.integers(1, 6))
    ta, tb = max(a, 0), max(b, 0)  # frame numbers are not negative
    choice = int(rng.integers(0, 20))
    if choice == 19:
        # Snip ids: two of the embryo's snips, sometimes one that is not.
        picks = rng.integers(start, start + n, size=2)
        ids = [str(part.index[p]) for p in picks]
        if rng.random() < 0.2:
            ids[1] = ids[1][:-4] + "9999"
        return ids
    templates = [
        "all",
        "first",
        "last",
        f"[{a}:{b}]",
        f"[::{k}]",
        f"[-{k * 3}:]",
        f"[{b}:{a}:-{k}]",
        f"[{b}]",
        f"[0:{k}, -1]",
        "death",
        f"death+{k}",
        f"death-{k}:death+{k}",
        "death:",
        f"[death-{k}:]",
        f"t{ta}..t{tb}",
        f"t{tb}",
        f"t{ta}..",
        f"[{a}, {b}, death]",
        f"[:{k}, t{tb}..]",
    ]
    return templates[choice]


def build_rows(
    rng: np.random.Generator,
    part: pd.DataFrame,
    n_rows: int,
    n_frames: int,
    diverse: bool = False,
) -> pd.DataFrame:
    n_embryos = len(part) // n_frames
    embryo = rng.integers(0, n_embryos, size=n_rows)
    block_ids = part["embryo_id"].to_numpy()[::n_frames]
    cache: dict[str, object] = {}
    specs = []
    for e in embryo.tolist():
        raw = random_spec(rng, part, e * n_frames, n_frames, diverse)
        key = raw if isinstance(raw, str) else repr(raw)
        if key not in cache:
            cache[key] = parse_range(raw)
        specs.append(cache[key])
    return pd.DataFrame(
        {
            "row": np.arange(n_rows, dtype=np.int64),
            "embryo_id": pd.array(block_ids[embryo], dtype="str"),
            "spec": pd.Series(specs, dtype=object),
        }
    )


def loop_select(part: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """The baseline: select_positions row by row in a Python loop.

    Same contract as expand_ranges (part and rows in, sorted pairs out), so
    the lookups it needs (each embryo's block and death frame) are built
    here, inside the timed region, as cheaply as pandas allows.
    """
    starts = np.flatnonzero(part["frame_index"].to_numpy() == 0)
    n = part["n_frames"].to_numpy()[starts]
    deaths = part["death_frame"].iloc[starts]
    blocks = dict(
        zip(
            part["embryo_id"].iloc[starts].tolist(),
            zip(
                starts.tolist(),
                n.tolist(),
                deaths.astype(object).where(deaths.notna(), None).tolist(),
                strict=True,
            ),
            strict=True,
        )
    )
    frames = part["frame"].to_numpy()
    out_rows, out_pos = [], []
    for row, embryo, spec in sorted(
        zip(
            rows["row"].tolist(),
            rows["embryo_id"].tolist(),
            rows["spec"].tolist(),
            strict=True,
        )
    ):
        block = blocks.get(embryo)
        if block is None:
            continue
        start, n, death = block
        stop = start + n
        snip_ids = part.index[start:stop] if spec.snip_ids else None
        positions = select_positions(spec, frames[start:stop], death, snip_ids=snip_ids)
        out_rows.append(np.full(positions.size, row, dtype=np.int64))
        out_pos.append(positions + start)
    return pd.DataFrame(
        {"row": np.concatenate(out_rows), "pos": np.concatenate(out_pos)}
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embryos", type=int, default=20_000)
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--loop-repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--diverse",
        action="store_true",
        help="draw slice bounds and frames from every value, not a pool of round numbers",
    )
    parser.add_argument(
        "--spec", help="give every row this one spec instead of the mix"
    )
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    part = build_part(rng, args.embryos, args.frames)
    rows = build_rows(rng, part, args.rows, args.frames, args.diverse)
    if args.spec is not None:
        rows["spec"] = pd.Series([parse_range(args.spec)] * len(rows), dtype=object)
    n_distinct = rows["spec"].nunique()
    print(
        f"setup: {len(part):,} snips, {len(rows):,} rows, {n_distinct:,} distinct specs "
        f"({time.perf_counter() - t0:.1f} s)"
    )

    # Wall time and CPU time of this process, per run: on a shared machine the
    # CPU time is less disturbed by other jobs (it leaves out time spent
    # waiting for a core), so both are reported.
    vector_times, loop_times, vector_cpu, loop_cpu = [], [], [], []
    for i in range(max(args.repeat, args.loop_repeat)):
        if i < args.repeat:
            t0, c0 = time.perf_counter(), time.process_time()
            pairs, outcomes = expand_ranges(part, rows)
            vector_times.append(time.perf_counter() - t0)
            vector_cpu.append(time.process_time() - c0)
        if i < args.loop_repeat:
            t0, c0 = time.perf_counter(), time.process_time()
            expected = loop_select(part, rows)
            loop_times.append(time.perf_counter() - t0)
            loop_cpu.append(time.process_time() - c0)
    vector, loop = min(vector_times), min(loop_times)

    pd.testing.assert_frame_equal(pairs.reset_index(drop=True), expected)
    counts = outcomes["reason"].value_counts().to_dict()
    print(f"pairs: {len(pairs):,}; outcomes: {counts}")
    print(
        f"expand_ranges (vectorised, best of {args.repeat}): {vector * 1e3:8.1f} ms  (all: {', '.join(f'{t * 1e3:.1f}' for t in vector_times)})"
    )
    print(
        f"select_positions loop (best of {args.loop_repeat}):         {loop * 1e3:8.1f} ms  (all: {', '.join(f'{t * 1e3:.1f}' for t in loop_times)})"
    )
    print(
        f"CPU time, best: expand_ranges {min(vector_cpu) * 1e3:.1f} ms, loop "
        f"{min(loop_cpu) * 1e3:.1f} ms, speed-up {min(loop_cpu) / min(vector_cpu):.0f}x"
    )
    print(
        f"speed-up (wall): {loop / vector:.0f}x   [python {platform.python_version()}, numpy {np.__version__}, pandas {pd.__version__}]"
    )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average (1, 5, 15 min) at the end: {load}; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
