"""SG-LoRA: semantic-guided generation.

Embed the new task's description; cosine similarity to every expert task's embedding; the
top-K experts (K = 4) weighted by a temperature softmax ``a``; the target distribution

    mu*  = sum_k a_k mu_k
    var* = sum_k a_k var_k + sum_k a_k (mu_k - mu*)^2

where mu_k, var_k are the mean and variance of expert k's parameters over its late
checkpoints; a CVAE conditioned on (mu*, var*) then produces the adapter. The CVAE is trained
leave-one-out: an expert's own prior is built from the *other* experts, exactly as an unseen
task's will be, so it learns how a true adapter departs from its neighbours' mixture.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedlora.core.tasks import Example
from fedlora.hub.generators.base import Generator, expand_per_tensor, per_tensor
from fedlora.hub.generators.cvae import ConvCVAE, CVAESettings, fit_cvae
from fedlora.hub.generators.embedding import TextEmbedder, fit_embedder
from fedlora.hub.generators.library import ExpertLibrary, Layout

TOP_K = 4
TEMPERATURE = 0.02
VAR_FLOOR = 1e-8


def mixture_weights(similarities: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the top-k similarities and their softmax(sim / temperature) weights; -inf
    entries (excluded experts) are never picked."""
    k = min(k, int(torch.isfinite(similarities).sum()))
    if k < 1:
        raise ValueError("no expert to draw a prior from")
    top, idx = similarities.topk(k)
    return idx, torch.softmax(top / temperature, dim=0)


def mixture_prior(
    means: torch.Tensor, variances: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu*, var*) of the mixture of experts ``idx`` with ``weights`` (law of total variance)."""
    mu_k, var_k = means[idx], variances[idx]  # (k, D)
    w = weights.unsqueeze(1)
    mu = (w * mu_k).sum(0)
    var = (w * var_k).sum(0) + (w * (mu_k - mu) ** 2).sum(0)
    return mu, var


def tensor_scales(vectors: torch.Tensor, layout: Layout) -> torch.Tensor:
    """One scale per tensor of the layout (the std of its values over all experts), per parameter."""
    stds = torch.stack([t.std() for t in per_tensor(vectors, layout)]).clamp_min(1e-6)
    return expand_per_tensor(stds, layout)


class SGLoRA(Generator):
    method = "sg-lora"

    def __init__(
        self,
        *args: Any,
        means: torch.Tensor,
        variances: torch.Tensor,
        keys: torch.Tensor,
        scale: torch.Tensor,
        top_k: int = TOP_K,
        temperature: float = TEMPERATURE,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.means, self.variances, self.keys, self.scale = means, variances, keys, scale
        self.top_k, self.temperature = top_k, temperature

    def condition(self, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """(2, D): the prior mean in tensor units and its log standard deviation."""
        return torch.stack([mu / self.scale, 0.5 * torch.log(var / self.scale**2 + VAR_FLOOR)])

    def prior(self, query: np.ndarray, exclude: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        sims = self.keys @ torch.from_numpy(np.asarray(query, dtype=np.float32))
        if exclude is not None:
            sims[exclude] = -torch.inf
        idx, w = mixture_weights(sims, self.top_k, self.temperature)
        return mixture_prior(self.means, self.variances, idx, w)

    @classmethod
    def fit(
        cls,
        library: ExpertLibrary,
        settings: CVAESettings,
        embedding: str = "tfidf",
        top_k: int = TOP_K,
        temperature: float = TEMPERATURE,
        **_: Any,
    ) -> SGLoRA:
        if len(library.experts) < 2:
            raise ValueError("SG-LoRA needs at least two experts (each one's prior comes from the others)")
        embedder: TextEmbedder = fit_embedder(embedding, [d for e in library.experts for d in e.descriptions])
        per_desc = [torch.from_numpy(embedder.embed(e.descriptions)) for e in library.experts]
        keys = torch.stack([torch.nn.functional.normalize(d.mean(0), dim=0) for d in per_desc])
        means = torch.stack([e.mean for e in library.experts])
        variances = torch.stack([e.variance for e in library.experts])
        scale = tensor_scales(means, library.layout)
        cvae = ConvCVAE(library.layout.size, 2, 0, settings)
        gen = cls(
            library.layout,
            library.base_model,
            library.names(),
            embedder,
            settings,
            cvae,
            means=means,
            variances=variances,
            keys=keys,
            scale=scale,
            top_k=top_k,
            temperature=temperature,
        )
        # leave-one-out priors for every (expert, description): computed once, sampled in training
        priors: list[list[torch.Tensor]] = []
        for k, descs in enumerate(per_desc):
            rows = []
            for q in descs:
                mu, var = gen.prior(q.numpy(), exclude=k)
                rows.append(torch.cat([mu.unsqueeze(0), gen.condition(mu, var)]))  # (3, D)
            priors.append(rows)
        checkpoints = [e.checkpoints for e in library.experts]

        def sample(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, None]:
            xs, conds = [], []
            for _ in range(n):
                k = int(torch.randint(len(checkpoints), (1,), generator=g))
                j = int(torch.randint(checkpoints[k].shape[0], (1,), generator=g))
                d = int(torch.randint(len(priors[k]), (1,), generator=g))
                row = priors[k][d]
                xs.append((checkpoints[k][j] - row[0]) / scale)
                conds.append(row[1:])
            return torch.stack(xs), torch.stack(conds), None

        gen.record_fit(fit_cvae(cvae, sample, settings), library)
        return gen

    def generate_vector(self, description: str, examples: Sequence[Example] = ()) -> torch.Tensor:
        query = self.embedder.embed([description])[0]
        mu, var = self.prior(query)
        residual = self.cvae.generate(self.condition(mu, var).unsqueeze(0), None)[0]
        return mu + self.scale * residual

    def retrieve(self, description: str) -> tuple[str, float]:
        """The nearest expert to a description and its similarity (the retrieval baseline)."""
        sims = self.keys @ torch.from_numpy(self.embedder.embed([description])[0])
        best = int(sims.argmax())
        return self.experts[best], float(sims[best])

    def arrays(self) -> dict[str, torch.Tensor]:
        return {"means": self.means, "variances": self.variances, "keys": self.keys, "scale": self.scale}

    def options(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "temperature": self.temperature}

    @classmethod
    def keywords(cls, arrays: dict[str, torch.Tensor], options: Mapping[str, Any]) -> dict[str, Any]:
        return {
            **{k: arrays[k] for k in ("means", "variances", "keys", "scale")},
            "top_k": int(options.get("top_k", TOP_K)),
            "temperature": float(options.get("temperature", TEMPERATURE)),
        }
