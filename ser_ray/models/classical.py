"""Classical families over utterance functionals: logistic regression (``logreg``), SVM (``svm``) and
a small multilayer perceptron (``mlp``).

scikit-learn fits them; the fitted numbers (scaler statistics, weights, support vectors) are then
copied into an ``nn.Module``, so a classical model saves, loads, joins a bundle, runs in Serve and in
offline annotation exactly like a deep one, with one inference path. ``forward`` takes functionals
``[B, D, 1]`` and returns logits whose softmax is the model's class probability.

``fit_arrays`` picks what the hyperparameters leave open (``C`` and the RBF ``gamma`` when they are
None) by speaker-grouped cross-validation inside the training speakers, refits on all of them, and
scales the logits so that the out-of-fold probabilities are calibrated (one temperature, fitted by
likelihood). Training takes seconds, so it runs in the calling process: no Ray Train worker group.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import time

import numpy as np
import torch
from scipy.special import softmax
from torch import nn

from ser_ray.features.config import FeatureConfig
from ser_ray.models import register

# Feature settings of the functionals both families read: 64 log-mels and 20 MFCCs over 32 ms frames
# every 10 ms (speech framing; the deep families' 128 ms frames blur pitch).
FUNCTIONALS = {"n_mels": 64, "n_mfcc": 20, "n_fft": 512, "hop_length": 160}
C_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
RBF_C_GRID = (0.3, 1.0, 3.0, 10.0, 30.0)
RBF_GAMMA_GRID = (0.25, 0.5, 1.0, 2.0)  # times 1/D ("scale" on standardised features)
INNER_FOLDS = 5  # speaker-grouped folds of the inner cross-validation (fewer with fewer speakers)
MLP_ALPHA_GRID = (0.3, 3.0, 30.0)  # L2 penalty of the MLP


@dataclasses.dataclass
class LogRegHparams:
    C: float | None = None  # inverse L2 strength; None: chosen by speaker-grouped inner CV over C_GRID
    class_weight: str = "balanced"  # balanced | none


@dataclasses.dataclass
class SVMHparams:
    kernel: str = "linear"  # linear | rbf (one-vs-rest either way)
    C: float | None = None  # None: chosen by inner CV
    gamma: float | None = None  # rbf width in units of 1/D; None: chosen by inner CV
    class_weight: str = "balanced"  # balanced | none


@dataclasses.dataclass
class MLPHparams:
    hidden: int = 128  # units in the one hidden layer (ReLU)
    alpha: float | None = None  # L2 penalty; None: chosen by inner CV over MLP_ALPHA_GRID
    seeds: int = 3  # networks averaged (log-probabilities) in the saved model; the inner CV uses one
    max_iter: int = 300
    class_weight: str = "none"  # scikit-learn's MLP has no class weights


class _ClassicalModel(nn.Module):
    """The shared part: a standard scaler in buffers and a logit scale calibrated out of fold."""

    def __init__(self, num_classes: int, feature_config: FeatureConfig, hparams):
        super().__init__()
        if hparams.class_weight not in ("balanced", "none"):
            raise ValueError(f"class_weight {hparams.class_weight!r}: choose balanced or none")
        self.num_classes = num_classes
        self.hparams = hparams
        self.num_features = self.encoded_size(feature_config, hparams)
        self.register_buffer("mean", torch.zeros(self.num_features))
        self.register_buffer("scale", torch.ones(self.num_features))
        self.register_buffer("logit_scale", torch.ones(()))

    # -- from cached features to the vector the classifier reads ----------------------------------
    @staticmethod
    def encoded_size(feature_config: FeatureConfig, hparams) -> int:
        """Length of the vector ``encode`` makes of one clip (functionals: the vector itself)."""
        return int(np.prod(feature_config.shape))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Cached features ``[B, C, F]`` -> ``[B, num_features]`` (functionals: flattened)."""
        return x.flatten(1).float()

    # True where fit_encoder learns something (boaw's codebooks): the inner CV then learns it again
    # inside each inner fold; functionals are encoded by a fixed function and standardised once.
    learns_encoder = False

    def fit_encoder(self, x: np.ndarray) -> None:
        """Learn what ``encode`` needs from the training clips' features (never their labels);
        functionals need nothing."""

    def encode_array(self, x: np.ndarray) -> np.ndarray:
        """``encode`` for fitting: numpy in, float64 ``[N, num_features]`` out."""
        return np.asarray(x, dtype=np.float64).reshape(len(x), -1)

    def _inner_fold_features(self, raw: np.ndarray, train_idx: np.ndarray, test_idx: np.ndarray,
                             raw_copies: np.ndarray, copy_idx: np.ndarray):
        """Standardised encodings of an inner fold's training rows, its training speakers' copies and
        its held-out rows by an encoder learnt from the training rows alone (a copy of this model), so
        out-of-fold predictions never come from audio words the held-out speakers shaped."""
        scratch = copy.deepcopy(self)
        scratch.fit_encoder(raw[train_idx])
        v_train, v_test = scratch.encode_array(raw[train_idx]), scratch.encode_array(raw[test_idx])
        mean, scale = mean_scale(v_train)
        v_copies = scratch.encode_array(raw_copies[copy_idx]) if len(copy_idx) else v_train[:0]
        return (v_train - mean) / scale, (v_copies - mean) / scale, (v_test - mean) / scale

    def standardise(self, v: torch.Tensor) -> torch.Tensor:
        return (v - self.mean) / self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decision(self.standardise(self.encode(x))) * self.logit_scale

    # -- fitting ---------------------------------------------------------------------------------
    def candidates(self) -> list[dict]:
        """Hyperparameter settings the inner cross-validation chooses from."""
        raise NotImplementedError

    def _fit_scaled(self, z: np.ndarray, y: np.ndarray, params: dict, final: bool = False):
        """Fit on standardised features; return the fitted estimator (``final``: the model kept, not an
        inner-CV fold)."""
        raise NotImplementedError

    def _decision(self, estimator, z: np.ndarray) -> np.ndarray:
        """Decision values ``[N, num_classes]`` of a fitted estimator (what ``forward`` reproduces)."""
        raise NotImplementedError

    def _load(self, estimator, z: np.ndarray) -> None:
        """Copy a fitted estimator into the module's parameters."""
        raise NotImplementedError

    def refit_logits(self, v_fit: np.ndarray, y_fit: np.ndarray, v_pred: np.ndarray, *,
                     final: bool = True) -> np.ndarray:
        """Logits ``[N, num_classes]`` for the rows encoded as ``v_pred`` (``encode_array`` of their
        features) of this model's chosen setting refitted on ``(v_fit, y_fit)``, with this model's
        encoder, standardisation and logit scale; the module itself is not changed. What self-training
        (``ser_ray.train.self_train``) refits, many times over the same rows: hence encodings, made
        once; ``final=False`` fits the way the inner CV does (the MLP: one network instead of ``seeds``)."""
        def z(v):
            return (v - self.mean.double().numpy()) / self.scale.double().numpy()

        (params,) = self.candidates()  # after fit_arrays the hparams name one setting
        with single_blas_thread():
            estimator = self._fit_scaled(z(v_fit), np.asarray(y_fit, dtype=np.int64), params, final=final)
            return self._decision(estimator, z(v_pred)) * float(self.logit_scale)

    @torch.no_grad()
    def fit_arrays(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray, copies: tuple | None = None) -> dict:
        """Fit on features ``[N, D(, 1)]``, labels ``[N]`` (0..L-1) and speaker ``groups``; return fit info.

        ``copies``: optional extra training rows ``(x, y, groups)`` (speed-perturbed copies of these
        clips, ``data.speed_perturb``) that are only ever trained on: each inner fold trains on the
        copies of its training speakers and is scored on original clips alone, and the standardisation
        and any learnt encoder come from the original clips (what the model will be shown).

        Open hyperparameters are chosen by the best mean UA over speaker-grouped inner folds (ties: the
        stronger regularisation, listed first). The returned ``oof_probs`` are out-of-fold
        probabilities of the chosen setting: every row predicted by a model that never saw its speaker.
        """
        from sklearn.metrics import balanced_accuracy_score
        from sklearn.model_selection import GroupKFold

        start = time.perf_counter()
        raw = x
        self.fit_encoder(raw)
        x = self.encode_array(raw)
        if x.shape[1] != self.num_features:
            raise ValueError(f"{self.family}: features have {x.shape[1]} values, the model expects {self.num_features}")
        y = np.asarray(y, dtype=np.int64)
        groups = np.asarray(groups).astype(str)
        raw_copies, y_copies, copy_groups = copies if copies is not None else (raw[:0], y[:0], groups[:0])
        y_copies, copy_groups = np.asarray(y_copies, dtype=np.int64), np.asarray(copy_groups).astype(str)
        unknown = sorted(set(copy_groups) - set(groups))
        if unknown:
            raise ValueError(f"copies of speakers {unknown[:3]} that are not among the training speakers")
        mean, scale = mean_scale(x)
        z = (x - mean) / scale
        z_copies = (self.encode_array(raw_copies) - mean) / scale if len(y_copies) else z[:0]
        n_groups = len(np.unique(groups))
        candidates = self.candidates()
        results = []
        oof: dict[int, np.ndarray] = {}
        if n_groups >= 2:
            splits = list(GroupKFold(n_splits=min(INNER_FOLDS, n_groups)).split(z, y, groups))
            decisions = [np.zeros((len(y), self.num_classes)) for _ in candidates]
            for train_idx, test_idx in splits:
                if len(np.unique(y[train_idx])) < 2:
                    continue
                copy_idx = np.flatnonzero(np.isin(copy_groups, groups[train_idx]))
                if self.learns_encoder:
                    z_train, z_copy, z_test = self._inner_fold_features(raw, train_idx, test_idx, raw_copies, copy_idx)
                else:
                    z_train, z_copy, z_test = z[train_idx], z_copies[copy_idx], z[test_idx]
                z_fit, y_fit = np.concatenate([z_train, z_copy]), np.concatenate([y[train_idx], y_copies[copy_idx]])
                for i, params in enumerate(candidates):
                    with single_blas_thread():
                        est = self._fit_scaled(z_fit, y_fit, params)
                        decisions[i][test_idx] = self._decision(est, z_test)
            for i, params in enumerate(candidates):
                oof[i] = decisions[i]
                results.append({**params, "inner_ua": float(balanced_accuracy_score(y, decisions[i].argmax(1)))})
            best = max(range(len(candidates)), key=lambda i: (results[i]["inner_ua"], -i))
        else:  # one speaker: nothing to validate on, keep the first (most regularised) setting
            best = 0
        chosen = candidates[best]
        for key, value in chosen.items():  # the saved hparams say what was used
            setattr(self.hparams, key, value)
        z_fit = np.concatenate([z, z_copies])  # RBF support vectors are rows of what was fitted
        with single_blas_thread():
            self._load(self._fit_scaled(z_fit, np.concatenate([y, y_copies]), chosen, final=True), z_fit)
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.scale.copy_(torch.as_tensor(scale, dtype=torch.float32))
        info = {"chosen": chosen, "grid": results, "inner_folds": min(INNER_FOLDS, n_groups), "n_train": len(y),
                "n_copies": len(y_copies)}
        if best in oof:
            temperature, nll = _fit_logit_scale(oof[best], y)
            self.logit_scale.fill_(temperature)
            oof_probs = softmax(oof[best] * temperature, axis=1)
            info.update(inner_ua=results[best]["inner_ua"], inner_nll=nll, logit_scale=temperature, oof_probs=oof_probs)
        info["seconds"] = round(time.perf_counter() - start, 2)
        return info


@register("logreg", input_kind="functionals", features=FUNCTIONALS)
class LogisticRegressionModel(_ClassicalModel):
    """Multinomial logistic regression (L2, lbfgs) on standardised functionals."""

    Hparams = LogRegHparams

    def __init__(self, num_classes: int, feature_config: FeatureConfig, hparams: LogRegHparams):
        super().__init__(num_classes, feature_config, hparams)
        self.linear = nn.Linear(self.num_features, num_classes)

    def decision(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z)

    def candidates(self) -> list[dict]:
        return [{"C": c} for c in ((self.hparams.C,) if self.hparams.C is not None else C_GRID)]

    def _fit_scaled(self, z, y, params, final=False):
        from sklearn.linear_model import LogisticRegression

        weight = "balanced" if self.hparams.class_weight == "balanced" else None
        return LogisticRegression(C=params["C"], class_weight=weight, max_iter=3000).fit(z, y)

    def _decision(self, est, z):
        return _full_decision(est.decision_function(z), est.classes_, self.num_classes)

    def _load(self, est, z):
        coef, bias = _full_linear(est.coef_, est.intercept_, est.classes_, self.num_classes)
        self.linear.weight.copy_(torch.as_tensor(coef, dtype=torch.float32))
        self.linear.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))


@register("svm", input_kind="functionals", features=FUNCTIONALS)
class SVMModel(_ClassicalModel):
    """One-vs-rest SVM on standardised functionals: linear (``LinearSVC``) or RBF (``SVC``).

    An RBF model keeps its support vectors (the union over the one-vs-rest machines) in a buffer
    whose size is known only after fitting; ``for_loading`` rebuilds it from ``model.json``.
    """

    Hparams = SVMHparams

    def __init__(self, num_classes: int, feature_config: FeatureConfig, hparams: SVMHparams, n_support: int = 0):
        super().__init__(num_classes, feature_config, hparams)
        if hparams.kernel not in ("linear", "rbf"):
            raise ValueError(f"svm kernel {hparams.kernel!r}: choose linear or rbf")
        if hparams.kernel == "linear":
            self.linear = nn.Linear(self.num_features, num_classes)
        else:
            self.register_buffer("support", torch.zeros(n_support, self.num_features))
            self.register_buffer("alpha", torch.zeros(n_support, num_classes))
            self.register_buffer("bias", torch.zeros(num_classes))
            self.register_buffer("gamma", torch.ones(()))

    @classmethod
    def for_loading(cls, num_classes, feature_config, hparams, extra):
        return cls(num_classes, feature_config, hparams, n_support=int(extra.get("n_support", 0)))

    def export_extra(self) -> dict:
        return {"n_support": int(self.support.shape[0])} if self.hparams.kernel == "rbf" else {}

    def decision(self, z: torch.Tensor) -> torch.Tensor:
        if self.hparams.kernel == "linear":
            return self.linear(z)
        kernel = torch.exp(-self.gamma * torch.cdist(z, self.support).pow(2))
        return kernel @ self.alpha + self.bias

    def candidates(self) -> list[dict]:
        hp = self.hparams
        if hp.kernel == "linear":
            return [{"C": c} for c in ((hp.C,) if hp.C is not None else C_GRID)]
        cs = (hp.C,) if hp.C is not None else RBF_C_GRID
        gammas = (hp.gamma,) if hp.gamma is not None else RBF_GAMMA_GRID
        return [{"C": c, "gamma": g} for c, g in itertools.product(cs, gammas)]

    def _fit_scaled(self, z, y, params, final=False):
        from sklearn.multiclass import OneVsRestClassifier
        from sklearn.svm import SVC, LinearSVC

        weight = "balanced" if self.hparams.class_weight == "balanced" else None
        if self.hparams.kernel == "linear":
            return LinearSVC(C=params["C"], class_weight=weight, max_iter=20000).fit(z, y)
        svc = SVC(kernel="rbf", C=params["C"], gamma=params["gamma"] / z.shape[1], class_weight=weight)
        return OneVsRestClassifier(svc).fit(z, y)

    def _decision(self, est, z):
        return _full_decision(est.decision_function(z), est.classes_, self.num_classes)

    def _load(self, est, z):
        if self.hparams.kernel == "linear":
            coef, bias = _full_linear(est.coef_, est.intercept_, est.classes_, self.num_classes)
            self.linear.weight.copy_(torch.as_tensor(coef, dtype=torch.float32))
            self.linear.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
            return
        machines = est.estimators_
        if len(est.classes_) == 2:  # sklearn fits one machine for two classes: class 1 vs class 0
            machines = [machines[0], machines[0]]
        index = np.unique(np.concatenate([m.support_ for m in machines if hasattr(m, "support_")]))
        alpha = np.zeros((len(index), self.num_classes))
        bias = np.full(self.num_classes, -1e3)  # classes absent from training are never chosen
        position = {int(i): j for j, i in enumerate(index)}
        for k, (cls, machine) in enumerate(zip(est.classes_, machines)):
            # two classes: one machine, split as -d/2 and +d/2 like _full_decision
            sign = (-0.5 if k == 0 else 0.5) if len(est.classes_) == 2 else 1.0
            if not hasattr(machine, "support_"):  # a constant predictor (one class in the fold)
                bias[cls] = 0.0
                continue
            rows = [position[int(i)] for i in machine.support_]
            alpha[rows, cls] = sign * machine.dual_coef_[0]
            bias[cls] = sign * float(machine.intercept_[0])
        self.support = torch.as_tensor(z[index], dtype=torch.float32)
        self.alpha = torch.as_tensor(alpha, dtype=torch.float32)
        self.bias = torch.as_tensor(bias, dtype=torch.float32)
        self.gamma = torch.tensor(float(self.hparams.gamma) / z.shape[1], dtype=torch.float32)


@register("mlp", input_kind="functionals", features=FUNCTIONALS)
class MLPModel(_ClassicalModel):
    """A one-hidden-layer perceptron (scikit-learn, Adam, L2) on standardised functionals; the saved
    model averages the log-probabilities of ``seeds`` networks. Its errors differ from the linear
    members', which is what an ensemble needs."""

    Hparams = MLPHparams

    def __init__(self, num_classes: int, feature_config: FeatureConfig, hparams: MLPHparams):
        super().__init__(num_classes, feature_config, hparams)
        self.nets = nn.ModuleList(
            nn.Sequential(nn.Linear(self.num_features, hparams.hidden), nn.ReLU(), nn.Linear(hparams.hidden, num_classes))
            for _ in range(max(1, hparams.seeds)))

    def decision(self, z: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.log_softmax(net(z), dim=1) for net in self.nets]).mean(0)

    def candidates(self) -> list[dict]:
        return [{"alpha": a} for a in ((self.hparams.alpha,) if self.hparams.alpha is not None else MLP_ALPHA_GRID)]

    def _fit_scaled(self, z, y, params, final=False):
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier

        seeds = len(self.nets) if final else 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter is the budget, not a failure
            return [MLPClassifier((self.hparams.hidden,), alpha=params["alpha"], max_iter=self.hparams.max_iter,
                                  random_state=seed).fit(z, y) for seed in range(seeds)]

    def _logits(self, net, z):
        """One network's output layer as ``[N, num_classes]`` logits (binary: ``[-o/2, o/2]``)."""
        hidden = np.maximum(z @ net.coefs_[0] + net.intercepts_[0], 0.0)
        return _full_decision(np.squeeze(hidden @ net.coefs_[1] + net.intercepts_[1], axis=-1)
                              if net.coefs_[1].shape[1] == 1 else hidden @ net.coefs_[1] + net.intercepts_[1],
                              net.classes_, self.num_classes)

    def _decision(self, nets, z):
        from scipy.special import log_softmax

        return np.mean([log_softmax(self._logits(net, z), axis=1) for net in nets], axis=0)

    def _load(self, nets, z):
        for module, net in zip(self.nets, nets):
            first, last = module[0], module[2]
            first.weight.copy_(torch.as_tensor(net.coefs_[0].T, dtype=torch.float32))
            first.bias.copy_(torch.as_tensor(net.intercepts_[0], dtype=torch.float32))
            # the output layer mapped onto every class, as _logits does
            weight, bias = _full_linear(net.coefs_[1].T, net.intercepts_[1], net.classes_, self.num_classes)
            last.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
            last.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))


def is_classical(family: str) -> bool:
    from ser_ray.models import MODELS

    return issubclass(MODELS.get(family, nn.Module), _ClassicalModel)


def _full_decision(decision: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """sklearn decision values (binary: one column for class 1) -> ``[N, num_classes]``; classes that
    were absent from the training rows get a very low value."""
    out = np.full((len(decision), num_classes), -1e3)
    decision = np.asarray(decision, dtype=np.float64)
    if decision.ndim == 1:
        out[:, classes[0]], out[:, classes[1]] = -decision / 2, decision / 2
    else:
        out[:, classes] = decision
    return out


def _full_linear(coef: np.ndarray, intercept: np.ndarray, classes: np.ndarray, num_classes: int):
    """A linear model's weights as ``[num_classes, D]`` and bias, matching ``_full_decision``."""
    weight = np.zeros((num_classes, coef.shape[1]))
    bias = np.full(num_classes, -1e3)
    if coef.shape[0] == 1:
        weight[classes[0]], weight[classes[1]] = -coef[0] / 2, coef[0] / 2
        bias[classes[0]], bias[classes[1]] = -intercept[0] / 2, intercept[0] / 2
    else:
        weight[classes], bias[classes] = coef, intercept
    return weight, bias



def single_blas_thread():
    """Fits of a few hundred rows run on one BLAS thread: more threads gain nothing on matrices this
    small, and while another process holds a core their spin-waiting made a logistic regression up
    to 15 times slower (7-class EmoDB logreg folds: 50 s instead of 3 s)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def mean_scale(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and std (constant columns: 1) of a standard scaler."""
    scale = x.std(axis=0)
    scale[scale < 1e-8] = 1.0
    return x.mean(axis=0), scale


def _fit_logit_scale(decision: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """The factor ``s`` minimising the cross-entropy of ``softmax(s * decision)``, and that cross-entropy."""
    from ser_ray.calibration import fit_temperature, nll

    scale = 1.0 / fit_temperature(decision, y, bounds=(1e-3, 1e3))
    return scale, nll(softmax(decision * scale, axis=1), y)
