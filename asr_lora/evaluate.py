"""Batched greedy decoding -> metrics report. Used by training (CER every N steps) and `asr-lora eval`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .metrics import Report, score


@dataclass
class EvalResult:
    """Scores of one evaluation pass."""

    report: Report
    eval_loss: float
    seconds: float
    ids: list[str]
    refs: list[str]
    hyps: list[str]
    skipped: list[tuple[str, str]]

    def metrics(self) -> dict:
        """The keys written to metrics.jsonl."""
        r = self.report
        return {"cer": r.cer, "cer_nospace": r.cer_nospace, "wer": r.wer, "swer": r.swer,
                "eval_loss": self.eval_loss, "eval_seconds": round(self.seconds, 3), "eval_n": r.n,
                "eval_skipped": len(self.skipped)}


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over label tokens (-100 ignored) and the number of tokens counted."""
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss, int((labels != -100).sum())


@torch.no_grad()
def evaluate_rows(model, tokenizer, collator: Callable, rows: Sequence[dict], *, batch_size: int = 16,
                  language: str = "ko", task: str = "transcribe", max_new_tokens: int = 128,
                  num_beams: int = 1, device=None, progress: bool = False) -> EvalResult:
    """Teacher-forced loss and greedy transcripts for ``rows``, scored with the Korean metrics."""
    from tqdm import tqdm

    start = time.perf_counter()
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    ids, refs, hyps, skipped = [], [], [], []
    loss_sum, n_tokens = 0.0, 0
    text_of = {str(r.get("id", i)): r["text"] for i, r in enumerate(rows)}
    batches = range(0, len(rows), batch_size)
    for start_i in tqdm(batches, desc="eval", leave=False, disable=not progress):
        chunk = [dict(r, id=str(r.get("id", start_i + j))) for j, r in enumerate(rows[start_i:start_i + batch_size])]
        batch = collator(chunk)
        skipped.extend(batch["skipped"])
        if not batch["ids"]:
            continue
        features = batch["input_features"].to(device=device, dtype=dtype if dtype != torch.float32 else None)
        labels = batch["labels"].to(device)
        # one encoder pass serves both the teacher-forced loss and generation
        encoded = model.get_encoder()(features)
        out = model(encoder_outputs=encoded, labels=labels, use_cache=False)
        batch_loss, batch_tokens = token_loss_sum(out.logits, labels)
        loss_sum += float(batch_loss)
        n_tokens += batch_tokens
        # bound decoding by the references: a hypothesis twice as long as its reference is already
        # all errors, and the bound stops untuned or 8-bit models from looping to the cap
        longest = int((labels != -100).sum(dim=1).max())
        cap = min(max_new_tokens, 2 * longest + 8)
        generated = model.generate(encoder_outputs=encoded, language=language, task=task,
                                   max_new_tokens=cap, num_beams=num_beams, use_cache=True)
        texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
        ids.extend(batch["ids"])
        refs.extend(text_of[i] for i in batch["ids"])
        hyps.extend(t.strip() for t in texts)
    if was_training:
        model.train()
    if not ids:
        raise ValueError(f"nothing to evaluate: all {len(rows)} rows were skipped ({skipped[:3]})")
    report = score(refs, hyps, ids=ids)
    return EvalResult(report=report, eval_loss=loss_sum / max(n_tokens, 1), seconds=time.perf_counter() - start,
                      ids=ids, refs=refs, hyps=hyps, skipped=skipped)
