"""Build KTO data from the same preference pairs and the same held-out split as examples/real/dpo.yaml.

KTO learns from answers labelled desirable or not. Each training pair of dpo.yaml's split becomes two
records: the chosen answer (desirable) and the rejected one (undesirable). The held-out pairs are
the very ones dpo.yaml holds out (``data.val_ratio`` of the pairs, by the seeded permutation
``train.seed`` that training uses), written both as KTO records (the run's held-out loss) and
untouched as pairs (``benchmarks/preference_heldout.py --pairs`` scores the KTO run on them).

    python examples/real/prepare_kto.py --out runs/real/kto-data
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tunelab.config import load_config
from tunelab.data.preferences import Feedback, Preference, feedback_to_json, preference_to_json
from tunelab.data.readers import load_preferences
from tunelab.data.tokenize import split_records

HERE = Path(__file__).resolve().parent


def as_feedback(pairs: Iterable[Preference]) -> list[Feedback]:
    """Each pair as two labelled records: chosen (desirable), then rejected (undesirable)."""
    records: list[Feedback] = []
    for pair in pairs:
        records.append(Feedback(pair.prompt, pair.chosen, True, pair.source))
        records.append(Feedback(pair.prompt, pair.rejected, False, pair.source))
    return records


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write ``rows`` as JSON lines; the number written."""
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def main() -> None:
    """Read the pairs of the DPO config, split them as its training does, write the KTO files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs-config", default=str(HERE / "dpo.yaml"),
                        help="the config whose data and held-out split to reuse (default: examples/real/dpo.yaml)")
    parser.add_argument("--out", default="runs/real/kto-data")
    args = parser.parse_args()

    cfg = load_config(args.pairs_config)
    if cfg.data.eval:
        raise SystemExit(f"{args.pairs_config}: expected a held-out split by data.val_ratio, not a data.eval file")
    pairs, report = load_preferences(cfg.data.train, cfg.data.on_error, cfg.data.system_prompt, cfg.data.max_samples)
    train, held_out = split_records(pairs, cfg.data.val_ratio, cfg.train.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_train = write_jsonl(out / "train.jsonl", map(feedback_to_json, as_feedback(train)))
    n_eval = write_jsonl(out / "heldout.jsonl", map(feedback_to_json, as_feedback(held_out)))
    write_jsonl(out / "heldout_pairs.jsonl", map(preference_to_json, held_out))
    print(f"{report.kept} pairs read from {', '.join(cfg.data.train)} ({sum(report.skipped.values())} skipped); "
          f"split as {args.pairs_config}: {len(train)} training, {len(held_out)} held out")
    print(f"wrote {out / 'train.jsonl'} ({n_train} labelled answers), {out / 'heldout.jsonl'} ({n_eval}), "
          f"{out / 'heldout_pairs.jsonl'} ({len(held_out)} pairs)")


if __name__ == "__main__":
    main()
