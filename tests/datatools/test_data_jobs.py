"""Each data tool's stage function owns its whole job: options checked, inputs found, outputs claimed, then work.

A library caller gets the command line's protection: an existing output is refused (and left
untouched) unless ``overwrite``, an input is never written, a mistyped input is named first, a
bad option is named before any output is claimed, and a generation job loads its backend only
after its outputs are claimed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from tunelab.data.readers import read_canonical
from tunelab.datatools.augment import AugmentOptions, augment_files
from tunelab.datatools.builders import build_files
from tunelab.datatools.convert import convert_files
from tunelab.datatools.cot import CotOptions, cot_files
from tunelab.datatools.generation_jobs import BackendSpec
from tunelab.datatools.quality import CleanOptions, clean_files
from tunelab.datatools.split import split_files
from tunelab.datatools.stats import stats_files
from tunelab.datatools.synth import QAOptions, SelfInstructOptions, self_instruct, synth_qa
from tunelab.errors import DataError, TunelabError
from tunelab.generation.backends import BackendError
from tunelab.outputs import OutputError

GSM8K_TEST = SHARED_DATA / "gsm8k" / "test.jsonl"
MINE = "my own file\n"


def _write(path: Path, rows: list[dict]) -> Path:
    """``rows`` as a JSON array (``.json``) or JSONL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def conversations(path: Path) -> Path:
    """30 different alpaca records."""
    rows = [{"instruction": f"Name {count} animals that live in {place}.",
             "output": f"{count} animals of {place}: " + ", ".join(f"animal {i}" for i in range(count))}
            for count, place in zip(range(1, 31), ["the sea", "a forest", "the desert", "a city", "the mountains"] * 6)]
    return _write(path, rows)


def gsm8k(path: Path) -> Path:
    """The first 6 GSM8K test problems."""
    return _write(path, [json.loads(line) for line in GSM8K_TEST.read_text().splitlines()[:6]])


@dataclass
class Job:
    """One data tool: how to make an input it reads, run it, and the output files it claims under ``out``."""

    make_input: Callable[[Path], Path]
    run: Callable[..., object]
    outputs: Callable[[Path], list[Path]]
    out_is_dir: bool = False


def _file_outputs(out: Path) -> list[Path]:
    return [out, out.with_name(f"{out.stem}.rejects.jsonl")]


JOBS = {
    "convert": Job(conversations, lambda inputs, out, **kw: convert_files(inputs, out, progress=False, **kw),
                   _file_outputs),
    "build": Job(gsm8k, lambda inputs, out, **kw: build_files(
        inputs, out, "summarization", fields={"document": "question", "summary": "answer"}, use_cache=False, **kw),
        _file_outputs),
    "cot": Job(gsm8k, lambda inputs, out, **kw: cot_files(inputs, out, use_cache=False, **kw), _file_outputs),
    "clean": Job(conversations, lambda inputs, out, **kw: clean_files(inputs, out, use_cache=False, **kw),
                 _file_outputs),
    "stats": Job(conversations, lambda inputs, out, **kw: stats_files(inputs, out, use_cache=False, png=False, **kw),
                 lambda out: [out / "stats.json", out / "report.md", out / "token_lengths.png"], out_is_dir=True),
    "split": Job(conversations, lambda inputs, out, **kw: split_files(inputs, out, "0.8,0.1,0.1", progress=False, **kw),
                 lambda out: [out / "train.jsonl", out / "val.jsonl", out / "test.jsonl"], out_is_dir=True),
}


def _out(tmp_path: Path, job: Job) -> Path:
    return tmp_path / ("out" if job.out_is_dir else "out.jsonl")


@pytest.mark.parametrize("name", sorted(JOBS))
def test_a_stage_function_refuses_an_existing_output_and_leaves_it_untouched(name: str, tmp_path: Path) -> None:
    job = JOBS[name]
    data = job.make_input(tmp_path / "in" / "data.jsonl")
    out = _out(tmp_path, job)
    for claimed in job.outputs(out):
        claimed.parent.mkdir(parents=True, exist_ok=True)
        claimed.write_text(MINE)
        with pytest.raises(OutputError, match=f"{claimed.name} already exists.*pass --overwrite"):
            job.run([str(data)], out)
        assert claimed.read_text() == MINE
        others = [path for path in job.outputs(out) if path.exists() and path != claimed]
        assert not others, f"{name} wrote {others} although it refused {claimed}"
        claimed.unlink()
    job.outputs(out)[0].write_text(MINE)
    job.run([str(data)], out, overwrite=True)
    assert job.outputs(out)[0].read_text() != MINE
    if name == "stats":  # a real result replaced it
        assert json.loads(job.outputs(out)[0].read_text())["records"] == 30
    else:
        assert read_canonical([str(job.outputs(out)[0])]).records


@pytest.mark.parametrize("name", sorted(JOBS))
def test_a_stage_function_never_writes_its_input_even_with_overwrite(name: str, tmp_path: Path) -> None:
    job = JOBS[name]
    out = _out(tmp_path, job)
    first = job.outputs(out)[0]
    data = job.make_input(first.with_suffix(".json") if name == "stats" else first)  # stats.json is JSON
    before = data.read_bytes()
    with pytest.raises(OutputError, match="is also an input of this command"):
        job.run([str(data)], out, overwrite=True)
    assert data.read_bytes() == before


@pytest.mark.parametrize("name", sorted(JOBS))
def test_a_mistyped_input_is_named_before_an_existing_output(name: str, tmp_path: Path) -> None:
    job = JOBS[name]
    data = job.make_input(tmp_path / "data.jsonl")
    out = _out(tmp_path, job)
    job.outputs(out)[0].parent.mkdir(parents=True, exist_ok=True)
    job.outputs(out)[0].write_text(MINE)
    with pytest.raises(DataError, match="nope.jsonl: data file not found"):
        job.run([str(data), str(tmp_path / "nope.jsonl")], out)


BAD_OPTIONS = {
    "build": (lambda inputs, out: build_files(inputs, out, "poetry"), "unknown task 'poetry'"),
    "cot": (lambda inputs, out: cot_files(inputs, out, CotOptions(step_format="{n}.")), "must contain {step}"),
    "clean": (lambda inputs, out: clean_files(inputs, out, CleanOptions(near_dup_threshold=1.5)),
              "--near-dup-threshold 1.5"),
    "stats": (lambda inputs, out: stats_files(inputs, out, bins=0), "--bins must be at least 1"),
    "split": (lambda inputs, out: split_files(inputs, out, "0.8,0.3"), "add up to 1.1"),
    "augment": (lambda inputs, out: augment_files(inputs, out, BackendSpec("bogus:x"), AugmentOptions(variants=0)),
                "variants and limit must be at least 1"),
    "synth qa": (lambda inputs, out: synth_qa(inputs, out, BackendSpec("bogus:x"), QAOptions(pairs_per_document=0)),
                 "pairs per document"),
}


@pytest.mark.parametrize("name", sorted(BAD_OPTIONS))
def test_options_are_checked_before_the_outputs_are_claimed(name: str, tmp_path: Path) -> None:
    run, message = BAD_OPTIONS[name]
    data = conversations(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    out.mkdir()
    for claimed in ("stats.json", "train.jsonl"):
        (out / claimed).write_text(MINE)
    existing = tmp_path / "existing.jsonl"
    existing.write_text(MINE)
    with pytest.raises(TunelabError, match=message) as raised:
        run([str(data)], out if name in ("stats", "split") else existing)
    assert not isinstance(raised.value, OutputError)
    assert existing.read_text() == MINE


GENERATION_JOBS = {
    "augment": (lambda inputs, out, **kw: augment_files(inputs, out, BackendSpec("bogus:x"), AugmentOptions(),
                                                        cache=False, progress=False, **kw),
                ("report.json", "failed.jsonl")),
    "synth qa": (lambda inputs, out, **kw: synth_qa(inputs, out, BackendSpec("bogus:x"), QAOptions(), cache=False,
                                                    progress=False, **kw),
                 ("report.json", "failed.jsonl", "rejects.jsonl")),
    "self-instruct": (lambda inputs, out, **kw: self_instruct(inputs, out, BackendSpec("bogus:x"),
                                                              SelfInstructOptions(), cache=False, progress=False, **kw),
                      ("report.json", "failed.jsonl", "rejects.jsonl")),
}


@pytest.mark.parametrize("name", sorted(GENERATION_JOBS))
def test_a_generation_job_claims_its_outputs_before_its_backend_loads(name: str, tmp_path: Path) -> None:
    run, suffixes = GENERATION_JOBS[name]
    data = conversations(tmp_path / "data.jsonl")
    out = tmp_path / "gen.jsonl"
    for claimed in [out, *(tmp_path / f"gen.{suffix}" for suffix in suffixes)]:
        claimed.write_text(MINE)
        # "bogus:x" would fail to load: the refusal proves nothing loaded before the claim.
        with pytest.raises(OutputError, match=f"{claimed.name} already exists"):
            run([str(data)], out)
        assert claimed.read_text() == MINE
        claimed.unlink()
    with pytest.raises(OutputError, match="is also an input"):
        run([str(data)], data, overwrite=True)
    with pytest.raises(BackendError, match="'bogus:x': expected openai:BASE_URL"):
        run([str(data)], out)  # the outputs are free: now the backend loads (and fails), nothing was written
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data.jsonl"]
