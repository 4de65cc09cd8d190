"""ICM-LoRA: in-context meta generation.

A CVAE maps a task vector to the flattened, per-tensor z-scored LoRA parameters (Conv1d
encoder/decoder, MSE + 0.005 KL). The task vector is the base model's last-token hidden state
averaged over a few examples of the task (in context) and/or the description's embedding;
training drops one of the two at random, so a request may bring either or both.

De-normalisation: the public code multiplies the generated z-scores back with the *target
task's own* per-tensor mean and std, i.e. it reads the adapter it claims to generate. Here the
per-tensor statistics are predicted from the task vector by a ridge regression fitted on the
experts only; generation reads nothing but this generator and the request.

The decoder has a closed-form path beside the CVAE: kernel ridge regression from the task
vector to the experts' z-scored adapters and statistics, with a sharp cosine kernel and the
weights normalised to sum to one (a task vector near one expert's draws on that expert; one
between experts, on a mixture of them); the CVAE models what it leaves. With 41 experts of
38,656 parameters the CVAE alone reproduced not even its training tasks (z-score MSE 0.07-0.7,
exact match ~0), and a linear kernel mixed every expert into every answer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedlora.core.tasks import Example
from fedlora.hub.generators.base import Generator, expand_per_tensor, per_tensor
from fedlora.hub.generators.cvae import ConvCVAE, CVAESettings, fit_cvae
from fedlora.hub.generators.embedding import TextEmbedder, fit_embedder, hidden_state_vector
from fedlora.hub.generators.library import Expert, ExpertLibrary, Layout

#: subsets of each expert's examples whose hidden states are precomputed for training
SUBSETS = 8
SUBSET_SIZE = 8
DROP = 0.25  # chance of training without the hidden states, and (separately) without the description
RIDGE = 1e-2
KERNEL_WIDTH = 0.02
ARRAYS = ("hidden_mean", "hidden_std", "rows", "row_expert", "inverse", "expert_targets")
STD_FLOOR = 1e-8


def zscore(vector: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor z-scores of a flat adapter and the (T, 2) statistics [mean, log std]."""
    parts = per_tensor(vector, layout)
    stats = torch.stack([torch.stack([t.mean(), torch.log(t.std(unbiased=False) + STD_FLOOR)]) for t in parts])
    mean, std = expand_per_tensor(stats[:, 0], layout), expand_per_tensor(stats[:, 1].exp(), layout)
    return (vector - mean) / std, stats


def denormalize(z: torch.Tensor, stats: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Inverse of :func:`zscore` with given (T, 2) statistics; ``z`` is re-standardised per
    tensor first, so the statistics alone set each tensor's location and spread."""
    z = torch.cat([(t - t.mean()) / (t.std(unbiased=False) + STD_FLOOR) for t in per_tensor(z, layout)])
    return z * expand_per_tensor(stats[:, 1].exp(), layout) + expand_per_tensor(stats[:, 0], layout)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T


def kernel(a: torch.Tensor, b: torch.Tensor, width: float = KERNEL_WIDTH) -> torch.Tensor:
    """exp((cos(a_i, b_j) - 1) / width): 1 for the same direction, falling fast away from it, so
    a task vector near one expert's draws on that expert alone (a linear kernel mixed them all)."""
    out: torch.Tensor = torch.exp((cosine(a, b) - 1.0) / width)
    return out


def ridge_fit(x: torch.Tensor, lam: float) -> torch.Tensor:
    """Kernel ridge regression's (K + lam I)^-1 for the training rows ``x``."""
    k = kernel(x, x).double()
    return torch.linalg.inv(k + lam * torch.eye(x.shape[0], dtype=torch.float64)).float().contiguous()


def expert_weights(
    inverse: torch.Tensor, rows: torch.Tensor, row_expert: torch.Tensor, x: torch.Tensor, n: int
) -> torch.Tensor:
    """(B, n) kernel-ridge weights per expert, normalised to sum to one (Nadaraya-Watson).

    The kernel row is scaled by its largest value first (the normalised weights do not change),
    so a query unlike every expert still gets a mixture, never weights that underflowed to zero;
    should the ridge weights not sum to a positive number, the plain kernel weights are used."""
    cos = cosine(x, rows)
    k = torch.exp((cos - cos.max(1, keepdim=True).values) / KERNEL_WIDTH)  # (B, R), max 1
    owners = row_expert.long()
    out = torch.zeros(x.shape[0], n).index_add_(1, owners, k @ inverse)
    plain = torch.zeros(x.shape[0], n).index_add_(1, owners, k)
    total = out.sum(1, keepdim=True)
    ok = total > 1e-3 * plain.sum(1, keepdim=True)
    return torch.where(ok, out / total.clamp_min(1e-12), plain / plain.sum(1, keepdim=True))


class ICMLoRA(Generator):
    method = "icm-lora"

    def __init__(
        self,
        *args: Any,
        hidden_mean: torch.Tensor,
        hidden_std: torch.Tensor,
        rows: torch.Tensor,
        row_expert: torch.Tensor,
        inverse: torch.Tensor,
        expert_targets: torch.Tensor,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.hidden_mean, self.hidden_std = hidden_mean, hidden_std
        # the linear path: training task vectors (R, F), each row's expert (R,), (K + lam I)^-1,
        # and per expert [mean z-scored adapter, per-tensor mean and log std] (E, D + 2T)
        self.rows, self.row_expert, self.inverse, self.expert_targets = rows, row_expert, inverse, expert_targets

    @property
    def needs_base_model(self) -> bool:
        return True

    def task_vector(self, hidden: np.ndarray | None, text: np.ndarray | None) -> torch.Tensor:
        """[standardised hidden states, description embedding, has-hidden, has-description]."""
        h = (
            (torch.from_numpy(np.asarray(hidden, np.float32)) - self.hidden_mean)
            / self.hidden_std
            / math.sqrt(self.hidden_mean.numel())  # unit norm on average, like the text part
            if hidden is not None
            else torch.zeros_like(self.hidden_mean)
        )
        e = torch.from_numpy(np.asarray(text, np.float32)) if text is not None else torch.zeros(self.embedder.dim)
        flags = torch.tensor([float(hidden is not None), float(text is not None)])
        return torch.cat([h, e, flags])

    def linear(self, cond: torch.Tensor) -> torch.Tensor:
        """The linear path's (B, D + 2T) prediction for task vectors (B, F)."""
        weights = expert_weights(self.inverse, self.rows, self.row_expert, cond, self.expert_targets.shape[0])
        return weights @ self.expert_targets

    def hidden(self, examples: Sequence[Example]) -> np.ndarray:
        if self.task_model is None:
            raise ValueError("ICM-LoRA needs the base model to read examples; none is loaded")
        model, tokenizer = self.task_model
        return hidden_state_vector(model, tokenizer, examples)

    @classmethod
    def fit(
        cls,
        library: ExpertLibrary,
        settings: CVAESettings,
        embedding: str = "tfidf",
        task_model: Any = None,
        **_: Any,
    ) -> ICMLoRA:
        if task_model is None:
            raise ValueError("ICM-LoRA training needs the base model (for the examples' hidden states)")
        model, tokenizer = task_model
        embedder: TextEmbedder = fit_embedder(embedding, [d for e in library.experts for d in e.descriptions])
        g = torch.Generator().manual_seed(settings.seed)

        def subsets(e: Expert) -> list[np.ndarray]:
            if not e.examples:
                return []
            out = []
            for _ in range(SUBSETS):
                pick = torch.randperm(len(e.examples), generator=g)[:SUBSET_SIZE].tolist()
                out.append(hidden_state_vector(model, tokenizer, [e.examples[i] for i in pick]))
            return out

        hidden = [subsets(e) for e in library.experts]
        pool = [h for hs in hidden for h in hs]
        if pool:
            stack = torch.from_numpy(np.stack(pool))
            h_mean, h_std = stack.mean(0), stack.std(0).clamp_min(1e-4)
        else:
            size = int(model.config.hidden_size)
            h_mean, h_std = torch.zeros(size), torch.ones(size)
        texts = [embedder.embed(e.descriptions) for e in library.experts]
        cvae = ConvCVAE(library.layout.size, 0, h_mean.numel() + embedder.dim + 2, settings)
        targets = [[zscore(c, library.layout) for c in e.checkpoints] for e in library.experts]
        size = library.layout.size
        expert_targets = torch.stack(
            [
                torch.cat(
                    [torch.stack([z for z, _ in t]).mean(0), torch.stack([st for _, st in t]).mean(0).reshape(-1)]
                )
                for t in targets
            ]
        )  # (E, D + 2T)
        gen = cls(
            library.layout,
            library.base_model,
            library.names(),
            embedder,
            settings,
            cvae,
            hidden_mean=h_mean,
            hidden_std=h_std,
            rows=torch.zeros(0),
            row_expert=torch.zeros(0),
            inverse=torch.zeros(0),
            expert_targets=expert_targets,
        )
        gen.task_model = task_model
        # the linear path's training rows: every expert under each modality (both, examples only,
        # description only) with two example subsets and two descriptions
        rows, owners = [], []
        for k in range(len(library.experts)):
            for h in [*hidden[k][:2], None]:
                for e in [*texts[k][:2], None]:
                    if h is None and e is None:
                        continue
                    rows.append(gen.task_vector(h, e))
                    owners.append(k)
        gen.rows, gen.row_expert = torch.stack(rows), torch.tensor(owners, dtype=torch.float32)
        gen.inverse = ridge_fit(gen.rows, RIDGE)

        def condition(k: int, gen_: torch.Generator) -> torch.Tensor:
            has_h = bool(hidden[k]) and float(torch.rand(1, generator=gen_)) >= DROP
            has_e = not has_h or float(torch.rand(1, generator=gen_)) >= DROP
            h = hidden[k][int(torch.randint(len(hidden[k]), (1,), generator=gen_))] if has_h else None
            e = texts[k][int(torch.randint(len(texts[k]), (1,), generator=gen_))] if has_e else None
            return gen.task_vector(h, e)

        def sample(n: int, gen_: torch.Generator) -> tuple[torch.Tensor, None, torch.Tensor]:
            xs, conds = [], []
            for _ in range(n):
                k = int(torch.randint(len(targets), (1,), generator=gen_))
                j = int(torch.randint(len(targets[k]), (1,), generator=gen_))
                cond = condition(k, gen_)
                xs.append(targets[k][j][0] - gen.linear(cond.unsqueeze(0))[0, :size])  # what the linear path leaves
                conds.append(cond)
            return torch.stack(xs), None, torch.stack(conds)

        gen.record_fit(fit_cvae(cvae, sample, settings), library)
        return gen

    def generate_vector(self, description: str, examples: Sequence[Example] = ()) -> torch.Tensor:
        hidden = self.hidden(examples) if examples else None
        text = self.embedder.embed([description])[0] if description else None
        cond = self.task_vector(hidden, text).unsqueeze(0)
        linear = self.linear(cond)[0]
        size = self.layout.size
        z = linear[:size] + self.cvae.generate(None, cond)[0]
        return denormalize(z, linear[size:].view(-1, 2), self.layout)

    def arrays(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ARRAYS}

    def options(self) -> dict[str, Any]:
        return {
            "subsets": SUBSETS,
            "subset_size": SUBSET_SIZE,
            "drop": DROP,
            "ridge": RIDGE,
            "kernel": "cosine-exp",
            "kernel_width": KERNEL_WIDTH,
        }

    @classmethod
    def keywords(cls, arrays: dict[str, torch.Tensor], options: Mapping[str, Any]) -> dict[str, Any]:
        if (options.get("kernel"), options.get("kernel_width"), options.get("ridge")) != (
            "cosine-exp",
            KERNEL_WIDTH,
            RIDGE,
        ):
            raise ValueError(
                f"this ICM-LoRA generator was fitted with kernel {options.get('kernel')!r} "
                f"(width {options.get('kernel_width')}, ridge {options.get('ridge')}), this version "
                f"uses 'cosine-exp' (width {KERNEL_WIDTH}, ridge {RIDGE}): retrain it"
            )
        out = {k: arrays[k] for k in ARRAYS}
        r, e = out["rows"].shape[0], out["expert_targets"].shape[0]
        owners = out["row_expert"]
        if (
            out["inverse"].shape != (r, r)
            or owners.shape != (r,)
            or not bool(((owners >= 0) & (owners < e) & (owners == owners.round())).all())
        ):
            raise ValueError("this ICM-LoRA generator's arrays do not fit together: retrain it")
        return out
