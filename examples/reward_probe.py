"""Where does a model know that an answer is wrong? Its log-probs versus its last token (where a reward head reads).

    python examples/reward_probe.py runs/quickstart/output/final

For every arithmetic preference pair (the correct working vs the same working with a slip) it
measures two things on the SFT model, before any reward training:

- how often the model's own log-prob of the answer ranks the correct one higher (what DPO reads);
- how well a linear probe on the hidden state of the last token (what a reward model's score head
  reads) tells the two apart: logistic regression on the difference of the two hidden states,
  fitted on the training pairs, scored on the held-out ones.

On the 2-layer quickstart model the first is 0.97 held out and the second 0.54-0.63: the verdict
is in the next-token distribution at the slip, not at the last token, so a reward model has to
learn the check itself — one bit per pair (docs/examples.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DATA = Path(__file__).parent / "data"


def pair_features(model, tokenizer, pairs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-token hidden states ``[pairs, 2, hidden]`` and answer log-probs ``[pairs, 2]`` (chosen, rejected)."""
    states, logps = [], []
    for pair in pairs:
        pair_states, pair_logps = [], []
        for side in ("chosen", "rejected"):
            prompt = tokenizer.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(pair["prompt"] + pair[side], tokenize=False)
            ids = tokenizer(full, return_tensors="pt", add_special_tokens=False)["input_ids"]
            start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                out = model(ids, output_hidden_states=True)
            pair_states.append(out.hidden_states[-1][0, -1])
            token_logps = torch.log_softmax(out.logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
            pair_logps.append(token_logps[start - 1:].sum())
        states.append(torch.stack(pair_states))
        logps.append(torch.stack(pair_logps))
    return torch.stack(states), torch.stack(logps)


def probe_accuracy(train: torch.Tensor, test: torch.Tensor, l2: float) -> tuple[float, float]:
    """Logistic regression on ``h(chosen) - h(rejected)`` (and its negation, labelled 0): train and test accuracy."""
    def xy(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        diff = states[:, 0] - states[:, 1]
        return torch.cat([diff, -diff]), torch.cat([torch.ones(len(diff)), torch.zeros(len(diff))])

    x, y = xy(train)
    mean, scale = x.mean(0), x.std(0) + 1e-6
    weights = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights, bias], max_iter=500)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = ((x - mean) / scale) @ weights + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + l2 * weights.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)

    def accuracy(states: torch.Tensor) -> float:
        features, labels = xy(states)
        with torch.no_grad():
            return float(((((features - mean) / scale) @ weights + bias > 0).float() == labels).float().mean())

    return accuracy(train), accuracy(test)


def main() -> None:
    """Print both measurements for a model directory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an SFT model directory (e.g. runs/quickstart/output/final)")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    load = lambda name: [json.loads(line) for line in (DATA / name).read_text().splitlines()]  # noqa: E731
    train_states, train_logps = pair_features(model, tokenizer, load("arithmetic_prefs_train.jsonl"))
    test_states, test_logps = pair_features(model, tokenizer, load("arithmetic_prefs_test.jsonl"))
    for name, logps in (("train", train_logps), ("held-out", test_logps)):
        print(f"answer log-prob ranks the correct answer higher ({name} pairs): {(logps[:, 0] > logps[:, 1]).float().mean():.3f}")
    for l2 in (1e-1, 1e-2, 1e-3):
        fit, held_out = probe_accuracy(train_states, test_states, l2)
        print(f"linear probe on the last token's hidden state (L2 {l2:g}): train {fit:.3f}, held-out {held_out:.3f}")


if __name__ == "__main__":
    main()
