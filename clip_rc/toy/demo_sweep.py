# Copyright 2024 The CLIP-RC authors and the clip-rc contributors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""`python -m clip_rc.toy.demo_sweep`: the demo over several seeds, and one table of all of them.

Each seed is a different world, different CLIPs and a different CLIP-RC training: `clip-rc-demo --seed s
--output_dir OUTPUT/seed-s` for every seed of `--seeds` (`0-9`, `0,3,7` or both), one after the other. A seed whose
folder already holds `results.json` is not run again (a sweep that stopped resumes; `--rerun` runs every seed).
Then the table of all the seeds found (`sweep.md` and `sweep.json` in OUTPUT) is written, also with `--table_only`,
which runs nothing: one row per seed, then the mean, min and max of every column.

Columns: mIoU over seen / unseen classes and their harmonic mean for CLIP-RC from the caption-trained CLIP, the IoU
of each unseen class, the same mIoUs for the control, the smallest margin over the unseen classes of the caption
run's IoU above the control's ("worst margin", > 0 when the caption run wins on every unseen class) and the
seconds of the demo. The targets of the demo (`--min_seen`, `--min_unseen`, a positive worst margin) are checked
on every seed; the sweep exits with status 1 if one is missed.
"""

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from ..utils import setup_logging, write_json_atomic, write_text_atomic
from . import demo


logger = logging.getLogger("clip_rc.toy.demo_sweep")

__all__ = ["format_sweep_table", "main", "missed_targets", "parse_seeds", "sweep_rows"]

RESULTS_FILE = "results.json"


def parse_seeds(text: str) -> list[int]:
    """`"0-9"` -> 0..9, `"0,3,7"` -> [0, 3, 7], `"0-2,5"` -> [0, 1, 2, 5]; in the order given, without repeats."""
    seeds: list[int] = []
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        low, dash, high = part.partition("-")
        try:
            values = range(int(low), int(high) + 1) if dash else [int(low)]
        except ValueError:
            raise ValueError(f"--seeds: {part!r} is neither a seed nor a range like 0-9") from None
        if dash and not values:
            raise ValueError(f"--seeds: the range {part!r} is empty")
        seeds.extend(seed for seed in values if seed not in seeds)
    if not seeds:
        raise ValueError(f"--seeds: no seed in {text!r}")
    return seeds


def sweep_rows(results: dict[int, dict]) -> list[dict]:
    """One row per seed (ascending) from the demo's `results.json` of each seed: the columns of the module
    docstring, in %."""
    rows = []
    for seed in sorted(results):
        result = results[seed]
        caption, control = (result["table"][run.description] for run in demo.RUNS)
        caption_iou, control_iou = (result["per_class_iou"][run.name] for run in demo.RUNS)
        unseen = result["benchmark"]["unseen_class_names"]
        margins = {name: (caption_iou[name] or 0.0) - (control_iou[name] or 0.0) for name in unseen}
        worst = min(margins, key=margins.get)
        row = {"seed": seed, "mIoU(S)": caption["mIoU(S)"], "mIoU(U)": caption["mIoU(U)"], "hIoU": caption["hIoU"]}
        row.update({name: caption_iou[name] for name in unseen})
        row.update({"control mIoU(S)": control["mIoU(S)"], "control mIoU(U)": control["mIoU(U)"]})
        row.update({"worst margin": margins[worst], "worst class": worst})
        row["seconds"] = result["timings_seconds"]["total"]
        rows.append(row)
    return rows


def missed_targets(rows: list[dict], min_seen: float, min_unseen: float) -> list[str]:
    """The demo's targets missed, one sentence per seed and target (empty when every seed meets them)."""
    missed = []
    for row in rows:
        if not row["mIoU(S)"] >= min_seen:
            missed.append(f"seed {row['seed']}: seen mIoU {row['mIoU(S)']:.2f} < {min_seen}")
        if not row["mIoU(U)"] >= min_unseen:
            missed.append(f"seed {row['seed']}: unseen mIoU {row['mIoU(U)']:.2f} < {min_unseen}")
        if not row["worst margin"] > 0:
            missed.append(
                f"seed {row['seed']}: not above the control on {row['worst class']} ({row['worst margin']:+.2f})"
            )
    return missed


def _cell(value) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def format_sweep_table(rows: list[dict]) -> str:
    """Markdown table of [`sweep_rows`], followed by the mean, min and max of every numeric column."""
    if not rows:
        raise ValueError("No demo results to tabulate.")
    columns = [column for column in rows[0] if column != "seed"]
    lines = ["| seed | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {row['seed']} | " + " | ".join(_cell(row[column]) for column in columns) + " |" for row in rows]
    for name, reduce in (("mean", lambda v: sum(v) / len(v)), ("min", min), ("max", max)):
        cells = []
        for column in columns:
            values = [row[column] for row in rows if isinstance(row[column], (int, float)) and row[column] is not None]
            cells.append(_cell(float(reduce(values))) if values and not isinstance(rows[0][column], str) else "")
        lines.append(f"| **{name}** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


RESULT_KEYS = ("seed", "quick", "table", "per_class_iou", "timings_seconds", "benchmark")


def _read_result(path: Path) -> dict:
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{path}: not JSON ({error})") from error
    missing = [key for key in RESULT_KEYS if not isinstance(result, dict) or key not in result]
    if missing:
        raise ValueError(f"{path}: not the results.json of a demo (missing {', '.join(missing)})")
    return result


def _read_results(output_dir: Path, quick: bool) -> dict[int, dict]:
    """The demo results of every `seed-*` folder of `output_dir`, by seed, of the demo variant `quick`."""
    results = {}
    for path in sorted(output_dir.glob(f"seed-*/{RESULTS_FILE}")):
        result = _read_result(path)
        if result["quick"] == quick:
            results[int(result["seed"])] = result
    return results


def _run_seeds(seeds: list[int], output_dir: Path, args: argparse.Namespace):
    for index, seed in enumerate(seeds):
        seed_dir = output_dir / f"seed-{seed}"
        done = (seed_dir / RESULTS_FILE).is_file() and _read_result(seed_dir / RESULTS_FILE)["quick"] == args.quick
        if done and not args.rerun:
            logger.info("seed %d (%d/%d): %s exists, not run again", seed, index + 1, len(seeds), seed_dir)
            continue
        logger.info("seed %d (%d/%d): running the demo in %s", seed, index + 1, len(seeds), seed_dir)
        argv = ["--seed", str(seed), "--output_dir", str(seed_dir)] + (["--quick"] if args.quick else [])
        demo.main(argv)


def _parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[int]]:
    parser = argparse.ArgumentParser(prog="python -m clip_rc.toy.demo_sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0-9", help="Seeds to run: a range 0-9, a list 0,3,7, or both.")
    parser.add_argument("--output_dir", default="outputs/demo-sweep", help="One folder per seed, and the table.")
    parser.add_argument("--quick", action="store_true", help="Sweep the demo's --quick variant.")
    parser.add_argument("--rerun", action="store_true", help="Run seeds that already have results again.")
    parser.add_argument("--table_only", action="store_true", help="Run nothing: tabulate the seeds already run.")
    parser.add_argument("--min_seen", type=float, default=75.0, help="Target: seen mIoU of every seed (%%).")
    parser.add_argument("--min_unseen", type=float, default=60.0, help="Target: unseen mIoU of every seed (%%).")
    args = parser.parse_args(argv)
    try:
        return args, parse_seeds(args.seeds)
    except ValueError as error:
        parser.error(str(error))


def _tabulate(seeds: list[int], output_dir: Path, args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """The table of the seeds' results (`sweep.md`, `sweep.json` and the standard output) and the targets missed."""
    results = {seed: result for seed, result in _read_results(output_dir, args.quick).items() if seed in seeds}
    if not results:
        raise SystemExit(f"No results.json of seeds {args.seeds} under {output_dir}/seed-*.")
    rows = sweep_rows(results)
    table = format_sweep_table(rows)
    missed = missed_targets(rows, args.min_seen, args.min_unseen)
    write_text_atomic(output_dir / "sweep.md", table + "\n")
    write_json_atomic(output_dir / "sweep.json", {"rows": rows, "missed_targets": missed, "quick": args.quick})
    sys.stdout.write(f"\nThe demo over seeds {', '.join(map(str, sorted(results)))}:\n{table}\n")
    return rows, missed


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the sweep (see the module docstring); returns the table's rows."""
    args, seeds = _parse_args(argv)
    setup_logging()
    output_dir = Path(args.output_dir)
    if not args.table_only:
        _run_seeds(seeds, output_dir, args)
    rows, missed = _tabulate(seeds, output_dir, args)
    for sentence in missed:
        logger.warning("target missed: %s", sentence)
    if missed:
        raise SystemExit(1)
    logger.info("every seed meets the targets (seen >= %s, unseen >= %s, caption run above the control on each "
                "unseen class)", args.min_seen, args.min_unseen)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
