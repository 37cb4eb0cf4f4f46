"""An MTP head that agrees with its main model by construction (acceptance ~1).

Zero every residual branch of the main model (attention ``o_proj``, FFN ``down_proj``, the
experts' down projections, shared experts included) and the trunk's residual stream stays the
current token's embedding ``e``: the model predicts ``f(t) = argmax lm_head(norm(e_t))``, a
known function of the current token. Make the MTP head compute the same function of the token
it is given: ``mtp_linear_proj = [I | 0]`` (keep the normed embedding, drop the hidden state),
``mtp_emb_norm`` weight 1 (so ``norm(norm(e)) == norm(e)``), and its block's ``o_proj`` and
``down_proj`` zero. Then the draft for position i+2 is ``f(t_{i+1})`` -- exactly the target's
next token -- whatever the hidden state, the final norm or the (random) other weights are.
The final norm is set to 1 as well, so vLLM's in-tree draft, which skips that norm, agrees too.

:func:`make_agree` works on (name, tensor) pairs by name, so the same rules apply to a
checkpoint's tensors (``model.layers.3.mlp.experts.5.down_proj.weight``,
``model.mtp_linear_proj.0.weight``) and to a loaded vLLM model's parameters (``w2_weight``,
``model.mtp_linear_proj.weight``, in-tree ``model.layers.28.mtp_linear_proj.weight``): it builds
the tiny CPU test checkpoints and, through ``LLM.collective_rpc``, the full-size GPU benchmark
model after a dummy load (no 40 GB file).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

_ZEROED = ("o_proj.weight", "o_proj.bias", "down_proj.weight", "down_proj.bias", "w2_weight", "w2_bias")


def make_agree(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Apply the construction in place; return how many tensors it changed."""
    changed = 0
    with torch.no_grad():
        for name, tensor in named_tensors:
            if name.endswith(_ZEROED):
                tensor.zero_()
            elif name.endswith(("mtp_emb_norm.weight", "mtp_emb_norm.0.weight")) or name in (
                "model.norm.weight",
                "norm.weight",
            ):
                tensor.fill_(1.0)
            elif "mtp_linear_proj" in name and name.endswith("weight"):
                if tensor.dim() != 2:
                    raise ValueError(
                        f"{name} has shape {list(tensor.shape)}, not [H, 2H]: repacked by the "
                        "platform (vLLM's CPU GEMMs); on CPU build the agreeing checkpoint "
                        "with make_tiny_checkpoint(..., mtp_agree=True) instead"
                    )
                rows, cols = tensor.shape
                hidden = min(rows, cols)
                tensor.zero_()
                eye = torch.eye(hidden, dtype=tensor.dtype, device=tensor.device)
                if cols == 2 * hidden:  # [H, 2H]: out = in[:H] (the embedding half)
                    tensor[:, :hidden] = eye
                else:  # stored transposed, [2H, H]
                    tensor[:hidden, :] = eye
            elif "mtp_linear_proj" in name and name.endswith("bias"):
                tensor.zero_()
            else:
                continue
            changed += 1
    return changed


def draft_model(worker):
    """The loaded MTP draft of one vLLM worker, or None without speculative decoding. The V1
    runner keeps it at ``model_runner.drafter.model``, the V2 runner (``VLLM_USE_V2_MODEL_RUNNER=1``;
    the only one in vLLM 0.34) at ``model_runner.speculator.model``; with speculative decoding
    configured and no draft found there it raises, rather than leave a random draft that reads
    as an acceptance of 0."""
    runner = worker.model_runner
    for attribute in ("drafter", "speculator"):
        draft = getattr(getattr(runner, attribute, None), "model", None)
        if draft is not None:
            return draft
    if getattr(worker.vllm_config, "speculative_config", None) is not None:
        raise RuntimeError(
            f"{type(runner).__name__} has speculative decoding configured, but no draft model "
            "at .drafter.model or .speculator.model"
        )
    return None


def make_loaded_models_agree(worker) -> dict[str, int]:
    """``LLM.collective_rpc`` target: the construction on the loaded target and draft of one
    vLLM worker (the draft found by :func:`draft_model`)."""
    counts = {"target": make_agree(worker.model_runner.model.named_parameters())}
    draft = draft_model(worker)
    if draft is not None:
        counts["draft"] = make_agree(draft.named_parameters())
    return counts


# --------------------------------------------------------------------------- tokens that change
#
# Under the construction above the model predicts f(t) = argmax lm_head(norm(e_t)); with a head
# tied to random embeddings that is t itself (a vector scores highest against itself), so every
# generated token repeats the prompt's last one, and a verification step reads one token's
# experts however many tokens it verifies. Real text changes token every step.
#
# The cycle construction rewrites an *untied* head so that f walks a permutation instead: row j
# of the head is (the direction of) e_{sigma(j)}, so the score of j for hidden state e_t is
# |e_t| cos(e_{sigma(j)}, e_t), highest where sigma(j) = t: f(t) = sigma^-1(t). With sigma one
# cycle through the whole vocabulary no token repeats for V steps, and the router sees a new
# residual stream (e_t) at every step. The agreeing MTP head computes f of the token it is
# given, so every draft is still accepted.
#
# Acceptance that can be set: split the hidden dimensions into halves A and B. Row j of the
# head is [A-half direction of e_{sigma(j)} ; B-half direction of e_{tau(j)}], the target's
# final norm keeps only A (weight 1 on A, 0 on B), the draft's own final norm (a separate
# parameter in the plugin's draft, vllm_ernie45.mtp.ErnieMTPDraft.norm) only B. The target
# then predicts sigma^-1(t), the draft tau^-1(t): tau equals sigma but for pairs of rows
# swapped, so the draft is wrong exactly on the tokens sigma(j) of the swapped rows -- a chosen
# fraction of the vocabulary, hence of a long walk along the cycle.


def cycle_permutation(vocab_size: int, seed: int = 0) -> torch.Tensor:
    """``sigma`` as an index tensor (``sigma[j]``): one cycle through all ``vocab_size`` tokens
    (no fixed point, so consecutive generated tokens always differ)."""
    order = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))
    sigma = torch.empty_like(order)
    sigma[order] = order.roll(-1)
    return sigma


def with_wrong_drafts(sigma: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """``tau``: ``sigma`` with ``fraction`` of its rows swapped in pairs; the draft built from
    it is wrong on the tokens ``sigma[j]`` of those rows and right everywhere else."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"wrong-draft fraction {fraction} is not in [0, 1]")
    n = sigma.numel()
    count = int(round(fraction * n)) // 2 * 2
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[:count]
    tau = sigma.clone()
    first, second = rows[0::2], rows[1::2]
    tau[first], tau[second] = sigma[second], sigma[first]
    return tau


def _directions(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` scaled to one common norm (their mean), in fp32."""
    rows = rows.float()
    norms = rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return rows / norms * norms.mean()


def cycle_head(embedding: torch.Tensor, sigma: torch.Tensor, tau: torch.Tensor | None = None) -> torch.Tensor:
    """The head's rows for :func:`make_cycle` (a new tensor of ``embedding``'s dtype)."""
    sigma = sigma.to(embedding.device)
    if tau is None:
        return _directions(embedding[sigma]).to(embedding.dtype)
    half = embedding.shape[1] // 2
    tau = tau.to(embedding.device)
    head = torch.cat([_directions(embedding[sigma, :half]), _directions(embedding[tau, half:])], dim=1)
    return head.to(embedding.dtype)


def norm_halves(norm: torch.Tensor, keep: str) -> None:
    """A final norm's weight set to 1 on half ``keep`` ("A": the first, "B": the second) of
    the hidden dimensions and 0 on the other, in place."""
    half = norm.shape[0] // 2
    norm.zero_()
    (norm[:half] if keep == "A" else norm[half:]).fill_(1.0)


def make_cycle(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    sigma: torch.Tensor,
    tau: torch.Tensor | None = None,
    role: str = "checkpoint",
    head: bool = True,
) -> int:
    """The cycle construction on top of :func:`make_agree`, in place: the untied head
    (``lm_head.weight``, rebuilt from ``model.embed_tokens.weight``, so applying it twice
    gives the same tensor; ``head=False`` leaves it) and, with ``tau`` (acceptance set by
    :func:`with_wrong_drafts`), the final norms: ``model.norm.weight`` keeps half A
    (``role`` checkpoint or target), the plugin's draft's own ``norm.weight`` half B
    (``role="draft"``). A checkpoint stores one final norm, which vLLM loads into both the
    target and the draft: from a checkpoint alone the draft agrees everywhere, until the
    loaded draft's norm is switched to half B (:func:`make_loaded_models_cycle`). Returns how
    many tensors it changed."""
    if role not in ("checkpoint", "target", "draft"):
        raise ValueError(f"role {role!r}: checkpoint, target or draft")
    tensors = dict(named_tensors)
    changed = 0
    with torch.no_grad():
        if head:
            embedding, weight = tensors.get("model.embed_tokens.weight"), tensors.get("lm_head.weight")
            if embedding is None or weight is None or weight.data_ptr() == embedding.data_ptr():
                raise ValueError(
                    "the cycle construction needs the embedding and an untied LM head "
                    "(lm_head.weight); use a config with tie_word_embeddings false"
                )
            if weight.shape != embedding.shape or sigma.numel() != embedding.shape[0]:
                raise ValueError(
                    f"lm_head.weight {list(weight.shape)} / embedding {list(embedding.shape)} / "
                    f"permutation of {sigma.numel()}: the construction needs the whole vocabulary "
                    "on one rank (TP 1)"
                )
            weight.copy_(cycle_head(embedding, sigma, tau))
            changed += 1
        if tau is not None:
            name, keep = ("norm.weight", "B") if role == "draft" else ("model.norm.weight", "A")
            if name not in tensors:
                raise ValueError(
                    f"no {name} among the {role}'s parameters: a set acceptance needs the plugin's "
                    "draft, whose final norm is its own (vLLM's in-tree draft applies none)"
                )
            norm_halves(tensors[name], keep)
            changed += 1
    return changed


def _check_head_in_use(model: torch.nn.Module, head: torch.Tensor, embedding: torch.Tensor) -> None:
    """The logits the loaded model computes come from ``head`` as rewritten (a platform that
    computes them from a packed copy -- vLLM's CPU build -- would ignore the rewrite)."""
    rows = embedding[: min(8, embedding.shape[0])].to(head.dtype)
    got = model.compute_logits(rows)
    expected = rows.float() @ head.float().t()
    if got is None or not torch.equal(got.float()[:, : head.shape[0]].argmax(-1), expected.argmax(-1)):
        raise RuntimeError(
            "the loaded model computes its logits from another copy of the LM head than "
            "lm_head.weight (vLLM's CPU build packs it): build the head into the checkpoint "
            "(make_tiny_checkpoint(..., mtp_cycle_seed=, mtp_wrong_fraction=)) and rewrite the "
            "norms only (head=False)"
        )


def make_loaded_models_cycle(
    worker, seed: int = 0, wrong_fraction: float | None = None, head: bool = True
) -> dict[str, int]:
    """``LLM.collective_rpc`` target: :func:`make_cycle` on the loaded target and draft, after
    :func:`make_loaded_models_agree` (GPU, dummy weights). ``wrong_fraction`` (None: every
    draft right) sets the acceptance; ``head=False`` rewrites the two final norms only -- for a
    checkpoint that already holds the head (CPU, whose GEMMs read packed copies of the
    weights: ``make_tiny_checkpoint(..., mtp_cycle_seed=, mtp_wrong_fraction=)``). The head is
    checked to be the one the model's logits come from."""
    runner = worker.model_runner
    target = dict(runner.model.named_parameters())
    embedding = target["model.embed_tokens.weight"]
    sigma = cycle_permutation(embedding.shape[0], seed)
    tau = None if wrong_fraction is None else with_wrong_drafts(sigma, wrong_fraction, seed)
    counts = {"target": make_cycle(target.items(), sigma, tau, role="target", head=head)}
    if head:
        _check_head_in_use(runner.model, target["lm_head.weight"], embedding)
    draft = draft_model(worker)
    if draft is not None:
        params = dict(draft.named_parameters(remove_duplicate=False))
        # vLLM shares the target's embedding and head into the draft after loading it.
        params.setdefault("model.embed_tokens.weight", embedding)
        params.setdefault("lm_head.weight", target["lm_head.weight"])
        counts["draft"] = make_cycle(params.items(), sigma, tau, role="draft", head=head)
    return counts
