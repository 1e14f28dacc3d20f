"""The prompts ``tunelab verify`` asks every model: a text file (one user message a line) or any prompt data file."""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import DataError, TunelabError, read_user_text


def load_parity_prompts(path: str | Path, limit: int | None = None) -> list[list[dict[str, str]]]:
    """Conversations to answer, each ending with a user turn.

    Args:
        path: a ``.txt`` file (each non-empty line one user message) or a JSON/JSONL/CSV/Parquet file
            of prompts in any format tunelab reads (messages, sharegpt, alpaca, question/answer);
            a final assistant turn or ``output`` is dropped (the models write their own).
        limit: keep the first ``limit`` prompts.

    Raises:
        TunelabError: the file is missing, empty or holds a record that is not a prompt (named by line).
    """
    from tunelab.data.readers import load_prompts

    if limit is not None and limit < 1:
        raise TunelabError(f"--limit {limit}: must be at least 1")
    path = Path(path)
    if path.suffix == ".txt":
        lines = [line.strip() for line in read_user_text(path, "prompts file").splitlines()]
        prompts = [[{"role": "user", "content": line}] for line in lines if line]
    else:
        if not path.is_file():
            raise TunelabError(f"{path}: prompts file not found")
        try:
            records, _ = load_prompts([str(path)], on_error="fail")
        except DataError as exc:  # its hint (data.on_error) is a training config's: every prompt is needed here
            raise TunelabError(f"--prompts {str(exc).split(chr(10) + '(')[0]}") from None
        prompts = [record.messages for record in records]
    if not prompts:
        raise TunelabError(f"{path}: no prompts")
    return prompts[:limit]
