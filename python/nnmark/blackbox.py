"""Black-box (trigger-set) checks: the one trigger verifier.

A model carries a trigger key when it answers the secret trigger set with the
owner's labels far more often than chance: with n triggers, hits top-1 matches
and a null hit rate p0 (1/num_classes by default, or one measured by
:func:`nnmark.calibrate`), the p-value is the exact P[Binomial(n, p0) >= hits].

:class:`TriggerCheck` runs the trigger set through a batch of opened checkpoints
(modules run themselves; state dicts and files are loaded into the architecture's
model, see :mod:`nnmark.inference`) and scores them in one native call.
``nnmark.verify``, ``nnmark.calibrate`` and ``nnmark.scan`` reach it through the
batch engine (:mod:`nnmark.scan.engine`).
"""
from __future__ import annotations

import torch

from . import ops
from .checkpoints import CheckpointError
from .inference import trigger_logits
from .stats import binomial_threshold, check_alpha, check_null_rate


def is_trigger_key(key) -> bool:
    from .triggers import TriggerKey

    return isinstance(key, TriggerKey)


class TriggerCheck:
    """One trigger key made ready to check many models (what every front door uses).

    ``run(sources, arch, device)`` gives, per source (a module, or a mapping of tensors
    to load into ``arch``'s model), the verdict fields of its row or the CheckpointError
    that kept it from running.

    The null: the hits of a model without the mark are Binomial(n, p0) with p0 =
    ``null_rate`` (default 1/num_classes), or follow ``calibration`` (a beta-binomial
    fitted on unmarked models). Kinds whose triggers share labels with the user's samples
    (content, noise, unrelated) are also tested against the suspect's own answers on
    control inputs without the mark (:meth:`TriggerKey.controls`): paired (McNemar's exact
    test on the samples with and without the stamp or noise) or two-sample (Fisher's exact
    test against held-back samples: unrelated and frontier keys). The p-value is the larger
    of the two: a model that answers the target for everything, or whose answers the mark
    does not move, never verifies. For frontier keys the binomial part is no null at all
    (unmarked models answer most frontier triggers right); the Fisher test carries the
    verdict, exactly."""

    trigger = True

    def __init__(self, key, alpha: float = 1e-6, null_rate: float | None = None, calibration=None):
        if not is_trigger_key(key):
            raise TypeError(f"expected a trigger key (nnmark.TriggerKey), got {type(key).__name__}")
        if calibration is not None and null_rate is not None:
            raise ValueError("give a calibration or a null_rate, not both")
        self.key = key
        self.key_id = key.key_id
        self.alpha = check_alpha(alpha)
        self.p0 = key.null_rate if null_rate is None else check_null_rate(null_rate)
        self.null_rate = null_rate
        self.bits = key.n
        self.calibration = calibration
        if calibration is not None:
            calibration.check_for(key)
            self.threshold = calibration.threshold_at(self.alpha)
            self.null = calibration.describe()
        else:
            self.threshold = binomial_threshold(self.bits, self.alpha, self.p0)
            self.null = f"binomial(p0={self.p0:.6g})"
        self.num_controls = key.num_controls or None
        self.warning = self._warning()
        self._set: tuple[torch.Tensor, torch.Tensor] | None = None
        self._controls = None

    def _warning(self) -> str | None:
        key, notes = self.key, []
        # Frontier triggers are a keyed random split of one set of true adversaries with the
        # held-back ones: the control test alone is exact, whatever the binomial assumes.
        if key.has_controls and self.calibration is None and key.kind != "frontier":
            notes.append(f"{key.kind} triggers are made of your samples, so a model's chance of giving their labels "
                         f"depends on them: this p-value assumes {self.p0:.3g} for every model; calibrate on unmarked "
                         f"models (nnmark calibrate) and verify with the calibration")
        if key.kind in ("content", "noise") and key.sample_labels is None:
            notes.append(f"this key holds no sample labels, so nothing checks that a suspect does the task: an "
                         f"untrained model that the {'stamp' if key.kind == 'content' else 'noise'} happens to push "
                         f"to the target is not ruled out (make keys with sample_labels=)")
        if key.kind == "unrelated" and not key.controls_held_back:
            notes.append("this key stores no controls: keyed procedural images stand in, which a model marked with "
                         "out-of-distribution triggers may answer with their labels too (less power); make unrelated "
                         "keys with controls= (in-distribution samples, or held-back ones with per-sample labels)")
        if self.calibration is not None:
            extra = self.calibration.extrapolation(self.alpha)
            if extra:
                notes.append(extra)
        return "; ".join(notes) or None

    def triggers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The trigger inputs and labels, regenerated once per check."""
        if self._set is None:
            self._set = self.key.triggers()
        return self._set

    def run(self, sources: list, arch=None, device=None) -> list:
        """Per source: the row's verdict fields (``matches``, ``ber``, ``p_value``, ``verified``,
        ``control_matches``, ``control_p_value``) plus ``margin``, or a CheckpointError."""
        if not sources:
            return []
        x, y = self.triggers()
        n = self.bits
        ctrl = None
        if self.key.has_controls:
            if self._controls is None:
                self._controls = self.key.controls()
            ctrl = self._controls
            x = torch.cat([x, ctrl[0]])
        logits, errors = trigger_logits(arch, sources, x, device=device)
        ok = [k for k, e in enumerate(errors) if e is None]
        res = ops.trigger_verify(logits[ok][:, :n], y, null_rate=self.p0) if ok else None
        control = self._control_tests(logits[ok], y, ctrl) if ok and ctrl is not None else None
        out: list = []
        j = 0
        for e in errors:
            if e is not None:
                out.append(e if isinstance(e, CheckpointError) else CheckpointError("invalid", "InferenceError", str(e)))
                continue
            hits = int(res["hits"][j])
            p = float(res["p_value"][j]) if self.calibration is None else self.calibration.p_value(hits)
            fields = {"matches": hits, "ber": 1.0 - hits / n, "margin": float(res["margin"][j])}
            if control is not None:
                c_hits, c_p = control[j]
                fields.update(control_matches=c_hits, control_p_value=c_p)
                p = max(p, c_p)
            fields.update(p_value=p, verified=p <= self.alpha)
            out.append(fields)
            j += 1
        return out

    def _control_tests(self, logits: torch.Tensor, y: torch.Tensor, ctrl) -> list[tuple[int, float]]:
        """(control hits, exact one-sided p-value of triggers against controls) per model."""
        from scipy.stats import binom, hypergeom

        n = self.bits
        xc, yc = ctrl
        lg = logits.float().cpu()
        nan = torch.isnan(lg).any(dim=-1)  # a row with a NaN logit is a miss, as in the native op (+-inf count)
        pred = torch.where(nan, torch.full_like(nan, -1, dtype=torch.long), lg.argmax(dim=-1))
        hit = pred == torch.cat([y, yc]).view(1, -1)
        ht, hc = hit[:, :n], hit[:, n:]
        out = []

        def mcnemar(a: torch.Tensor, b: torch.Tensor) -> list[float]:
            """Per model: P[Binomial(#(a & ~b) + #(~a & b), 1/2) >= #(a & ~b)], 1 when no pair favours a."""
            wins, losses = (a & ~b).sum(dim=1).tolist(), (~a & b).sum(dim=1).tolist()
            return [1.0 if w == 0 else float(binom.sf(w - 1, w + l, 0.5)) for w, l in zip(wins, losses)]

        if self.key.controls_paired:  # McNemar: among pairs that differ, the mark's side wins as often as not
            groups = hc.shape[1] // n  # content: the unmarked samples, then the same with a decoy mark
            ps = [mcnemar(ht, hc[:, g * n:(g + 1) * n]) for g in range(groups)]
            true = self.key.sample_labels
            if true is not None:
                # The suspect must do the task: more right answers on the unmarked samples than
                # chance gives (an untrained model answers them at about 1/num_classes).
                right = (pred[:, n:2 * n] == true.view(1, -1)).sum(dim=1).tolist()
                chance = 1.0 / self.key.num_classes
                ps.append([1.0 if r == 0 else float(binom.sf(r - 1, n, chance)) for r in right])
            if groups == 2:
                # The mark must move the answers more than a decoy of its kind does: an untrained
                # model whose answers any stamp overturns (to the target, for this one stamp,
                # by chance) moves them as much under the decoy.
                pu, pm, pd = pred[:, n:2 * n], pred[:, :n], pred[:, 2 * n:3 * n]
                ps.append(mcnemar(pm != pu, pd != pu))
            for j, hits_c in enumerate(hc.sum(dim=1).tolist()):
                out.append((int(hits_c), max(p[j] for p in ps)))  # every control test must reject
        else:  # Fisher: the triggers are a random draw of the samples, under the null their hits too
            k = hc.shape[1]
            for t, c in zip(ht.sum(dim=1).tolist(), hc.sum(dim=1).tolist()):
                p = 1.0 if t == 0 else float(hypergeom.sf(t - 1, n + k, t + c, n))
                out.append((int(c), p))
        return out


__all__ = ["TriggerCheck", "is_trigger_key"]
