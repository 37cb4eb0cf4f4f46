"""MTP speculative decoding with the plugin's draft (vllm_ernie45.mtp), real vLLM on CPU.

Lossless: greedy tokens with ``speculative_config={"method": "mtp", "num_speculative_tokens":
k}`` equal those without, a batch of four prompts, on tiny checkpoints with a random MTP head
(the draft is rejected: vLLM's rejection path; k = 1 and 3), with a head that agrees with the
model by construction while the model's tokens walk a cycle through the vocabulary
(``vllm_ernie45.testing.tiny.mtp_agree``: every draft accepted, which also checks the draft's
math -- norms, projection, RoPE, shared head -- end to end, and a new token every step, as on
real text; k = 2 and 3), with a set acceptance (30 % of the vocabulary drafted wrong: the
accepted count exactly the construction's), with a head that agrees in part (its accepted
count equals a reference MTP head's), and under ``tensor_parallel_size=2``. A checkpoint
without the MTP head is one clear error.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from vllm_ernie45.testing.parity import default_prompts
from vllm_ernie45.testing.tiny.checkpoint import make_tiny_checkpoint

from conftest import run_vllm_greedy, start_vllm_must_fail

MAX_TOKENS = 16
EAGER = {"enforce_eager": True}


def mtp(k: int, **extra) -> dict:
    return {**EAGER, **extra, "speculative_config": {"method": "mtp", "num_speculative_tokens": k}}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("mtp-prompts") / "prompts.json"
    path.write_text(json.dumps(default_prompts(1024, n=4)))
    return path


@pytest.fixture(scope="module")
def random_head(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("mtp-random") / "m", "legacy", with_tokenizer=False)


@pytest.fixture(scope="module")
def agreeing_head(tmp_path_factory):
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("mtp-agree") / "m", "legacy", with_tokenizer=False, mtp_agree=True
    )


def greedy(model, tmp_path, name: str, prompts, vllm_args: dict, **options) -> dict:
    env = None
    if vllm_args.get("tensor_parallel_size", 1) > 1:
        # vLLM's CPU workers bind their OpenMP threads per NUMA node; one node here, so bind
        # each worker to a core by hand.
        env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    return run_vllm_greedy(model, tmp_path / f"{name}.json", prompts=prompts, max_tokens=MAX_TOKENS,
                           top_k=1, vllm_args=vllm_args, env=env, **options)  # fmt: skip


@pytest.fixture(scope="module")
def random_plain(random_head, prompts, tmp_path_factory):
    return greedy(random_head, tmp_path_factory.mktemp("mtp-plain"), "plain", prompts, EAGER)


def tokens(result: dict) -> list[list[int]]:
    return [o["tokens"] for o in result["outputs"]]


def acceptance(result: dict) -> float:
    counts = result["spec_decode"]
    return counts["accepted_tokens"] / max(counts["draft_tokens"], 1)


@pytest.mark.parametrize("k", [1, 3])
def test_lossless_with_a_rejected_draft(k, random_head, random_plain, prompts, tmp_path):
    result = greedy(random_head, tmp_path, f"k{k}", prompts, mtp(k))
    assert result["model_class"] == "vllm_ernie45.model.ErnieMoeForCausalLM"
    assert tokens(result) == tokens(random_plain)
    counts = result["spec_decode"]
    assert counts["drafts"] > 0 and counts["draft_tokens"] == k * counts["drafts"]


# --------------------------------------------------------------------------- tokens that change
# (vllm_ernie45.testing.tiny.mtp_agree: the cycle construction, issue 33)

CYCLE_SEED = 0


@pytest.fixture(scope="module")
def cycle(tmp_path_factory, prompts):
    """An agreeing checkpoint whose untied head makes the model walk one cycle through the
    vocabulary, its plain greedy run, and the cycle's inverse (the next token of ``t`` is
    ``inverse[t]``)."""
    import torch

    from vllm_ernie45.testing.tiny.mtp_agree import cycle_permutation

    tmp = tmp_path_factory.mktemp("mtp-cycle")
    model = make_tiny_checkpoint(tmp / "m", "legacy", with_tokenizer=False, mtp_agree=True,
                                 mtp_cycle_seed=CYCLE_SEED, tie_word_embeddings=False)  # fmt: skip
    sigma = cycle_permutation(json.loads((model / "config.json").read_text())["vocab_size"], CYCLE_SEED)
    inverse = torch.empty_like(sigma)
    inverse[sigma] = torch.arange(sigma.numel())
    return {"model": model, "plain": greedy(model, tmp, "plain", prompts, EAGER), "sigma": sigma,
            "inverse": inverse.tolist()}  # fmt: skip


def test_cycle_tokens_change_every_step_and_reach_new_experts(cycle, agreeing_head, prompts):
    """The plain run's tokens follow the cycle (each the inverse permutation of the one before,
    none repeated), and a verification step's three tokens route to more experts than under
    the same-token construction (HF on its greedy tokens: one token repeated, top_k experts
    per layer)."""
    from vllm_ernie45.testing.parity import run_hf
    from vllm_ernie45.testing.tiny.expert_reads import experts_per_step

    inverse = cycle["inverse"]
    for prompt, output in zip(json.loads(prompts.read_text()), tokens(cycle["plain"])):
        walk = [prompt[-1], *output]
        assert all(inverse[a] == b for a, b in zip(walk, walk[1:])), walk
        assert len(set(output)) == len(output)
    top_k = json.loads((agreeing_head / "config.json").read_text())["moe_k"]
    repeated = run_hf(str(agreeing_head), json.loads(prompts.read_text())[:1], MAX_TOKENS, 1, "float32")
    same = experts_per_step(agreeing_head, repeated["outputs"][0]["tokens"], window=3)
    changing = experts_per_step(cycle["model"], tokens(cycle["plain"])[0], window=3)
    assert all(count == top_k for counts in same.values() for count in counts), same
    mean = {layer: sum(counts) / len(counts) for layer, counts in changing.items()}
    print("distinct experts per layer per 3-token step: same-token", top_k, "cycle", mean)
    assert all(value > top_k + 1 for value in mean.values()), mean


@pytest.mark.parametrize("k, transposed", [(2, False), (3, True)])
def test_agreeing_head_is_accepted_and_lossless(k, transposed, cycle, prompts, tmp_path):
    """The cycle checkpoint's draft at k = 2 and k = 3 (chained draft steps): every draft
    accepted, the tokens those of the run without speculation. At k = 3 the head's
    ``mtp_linear_proj`` is stored ``[2H, H]`` (reported for some 300B -PT checkpoints;
    otherwise the same checkpoint): it loads transposed, and the head still agrees, which it
    would not if the halves were mixed."""
    model = cycle["model"]
    if transposed:
        model = make_tiny_checkpoint(tmp_path / "m", "legacy", with_tokenizer=False, mtp_agree=True,
                                     mtp_cycle_seed=CYCLE_SEED, tie_word_embeddings=False,
                                     mtp_transposed=True)  # fmt: skip
        shape = load_file(str(model / "model.safetensors"))["model.mtp_linear_proj.0.weight"].shape
        assert tuple(shape) == (128, 64)
    result = greedy(model, tmp_path, f"k{k}", prompts, mtp(k))
    assert acceptance(result) >= 0.95, result["spec_decode"]
    assert tokens(result) == tokens(cycle["plain"])


WRONG_FRACTION = 0.3


def test_acceptance_set_by_the_construction(cycle, prompts, tmp_path):
    """A checkpoint with the head of a set acceptance (30 % of the vocabulary drafted wrong),
    the loaded draft's final norm switched in place (``make_loaded_models_cycle(head=False)``:
    vLLM's CPU build computes the head from a packed copy, so the head comes from the
    checkpoint): tokens still the cycle's, and vLLM's accepted-draft count is exactly the one
    the construction implies -- the draft for the token after ``t`` is ``tau``'s inverse at
    ``t``, right where it equals the cycle's."""
    import torch

    from vllm_ernie45.testing.tiny.mtp_agree import with_wrong_drafts

    model = make_tiny_checkpoint(tmp_path / "m", "legacy", with_tokenizer=False, mtp_agree=True,
                                 mtp_cycle_seed=CYCLE_SEED, mtp_wrong_fraction=WRONG_FRACTION,
                                 tie_word_embeddings=False)  # fmt: skip
    result = greedy(model, tmp_path, "k1", prompts, mtp(1), rpc="vllm_ernie45.testing.tiny.mtp_agree:make_loaded_models_cycle",
                    rpc_kwargs={"seed": CYCLE_SEED, "wrong_fraction": WRONG_FRACTION, "head": False})  # fmt: skip
    assert result["rpc"] == {"target": 1, "draft": 1}
    assert tokens(result) == tokens(cycle["plain"])
    tau = with_wrong_drafts(cycle["sigma"], WRONG_FRACTION, CYCLE_SEED)
    tau_inverse = torch.empty_like(tau)
    tau_inverse[tau] = torch.arange(tau.numel())
    expected = [0, 0]
    for prompt, output in zip(json.loads(prompts.read_text()), tokens(cycle["plain"])):
        sequence = prompt + output
        drafts = [tau_inverse[t].item() for t in sequence[1:]]  # position i drafts token i + 2
        drafted, accepted = _simulated_k1(len(prompt), sequence, drafts)
        expected[0] += accepted
        expected[1] += drafted
    counts = result["spec_decode"]
    print("accepted / drafted", counts["accepted_tokens"], counts["drafts"], "expected", expected)
    assert 0 < expected[0] < expected[1]
    assert [counts["accepted_tokens"], counts["drafts"]] == expected, (counts, expected)


def test_another_speculative_method_gets_a_hidden_state_buffer(random_head, random_plain, prompts, tmp_path):
    """With a drafter that is not MTP (ngram here, eagle alike) the target's
    get_mtp_target_hidden_states() still returns a tensor: vLLM 0.26-0.31's V2 model runner
    slices it without a None check. Lossless, as any drafter must be."""
    ngram = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    result = greedy(random_head, tmp_path, "ngram", prompts, {**EAGER, "speculative_config": ngram})
    assert result["drafter_hidden_buffer"] is True and random_plain["drafter_hidden_buffer"] is False
    assert tokens(result) == tokens(random_plain)


MTP_1 = {"method": "mtp", "num_speculative_tokens": 1}


def test_checkpoint_without_mtp_tensors_is_one_clear_error(random_head, tmp_path):
    broken = tmp_path / "no-mtp"
    shutil.copytree(random_head, broken)
    tensors = {k: v for k, v in load_file(str(broken / "model.safetensors")).items() if ".mtp_" not in k}
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    out = start_vllm_must_fail(broken, speculative_config=MTP_1)
    assert "needs ERNIE 4.5's MTP head, but the checkpoint lacks" in out
    assert "'model.mtp_emb_norm.0.weight'" in out and "'model.mtp_linear_proj.0.weight'" in out


def test_config_without_mtp_layers_is_one_clear_error(tiny_checkpoint):
    out = start_vllm_must_fail(tiny_checkpoint("21b"), speculative_config=MTP_1)  # transformers-5 config: no num_nextn_predict_layers
    assert "needs ERNIE 4.5's MTP head, but the checkpoint's config.json has no 'num_nextn_predict_layers'" in out


# --------------------------------------------------------------------------- against a reference


def _partly_agreeing_head(path):
    """The agreeing construction, loosened: every residual branch (target and MTP block) random
    again, the hidden-state half of ``mtp_linear_proj`` a random matrix, the final norm random,
    the embedding half still the identity. The draft then agrees with the target on about half
    of the positions (20 of 41 drafts here), and which ones depends on every part of its
    computation -- hidden state (pre- or post-norm), attention with ERNIE's RoPE, FFN, final
    norm, head."""
    import torch

    file = path / "model.safetensors"
    tensors = load_file(str(file))
    gen = torch.Generator().manual_seed(7)
    for name, tensor in tensors.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensors[name] = torch.randn(tensor.shape, generator=gen) / tensor.shape[-1] ** 0.5
        elif name == "model.mtp_linear_proj.0.weight":
            hidden = tensor.shape[0]
            tensor[:, hidden:] = torch.randn(hidden, hidden, generator=gen) / hidden**0.5
    # A final norm far from uniform, so feeding the draft the normed trunk state instead of
    # the pre-norm one changes its drafts (20 vs 18 accepted here).
    norm = tensors["model.norm.weight"]
    tensors["model.norm.weight"] = torch.exp(torch.randn(norm.shape, generator=torch.Generator().manual_seed(11)))
    save_file(tensors, str(file), metadata={"format": "pt"})
    return path


def _reference_drafts(model_dir, sequence: list[int], pre_norm: bool = True) -> list[int]:
    """HF transformers' ERNIE model and decoder layer as the reference: the MTP head's greedy
    draft at every position i of ``sequence`` (a prediction of token i + 2), teacher-forced,
    computed as ERNIE's training code does (pre-norm trunk state, shared final norm)."""
    import torch
    from transformers import AutoConfig, Ernie4_5_MoeForCausalLM
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import (
        Ernie4_5_MoeDecoderLayer,
        Ernie4_5_MoeRMSNorm,
    )

    config = AutoConfig.from_pretrained(model_dir)
    model = Ernie4_5_MoeForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tensors = load_file(str(model_dir / "model.safetensors"))
    captured = {}
    model.model.norm.register_forward_pre_hook(lambda _m, args: captured.update(pre_norm=args[0]))
    ids = torch.tensor([sequence])
    with torch.no_grad():
        model(input_ids=ids)
        hidden = captured["pre_norm"][:, :-1]  # trunk state at positions 0 .. L-2
        if not pre_norm:  # FastDeploy's / vLLM in-tree's choice, for contrast
            hidden = model.model.norm(hidden)
        block = Ernie4_5_MoeDecoderLayer(config, layer_idx=0).eval()  # layer 0: dense FFN
        block.load_state_dict({k.removeprefix("model.mtp_block.0."): v for k, v in tensors.items()
                               if k.startswith("model.mtp_block.0.")})  # fmt: skip
        norms = {}
        for which in ("emb", "hidden"):
            norms[which] = Ernie4_5_MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
            norms[which].weight.copy_(tensors[f"model.mtp_{which}_norm.0.weight"])
        embeds = model.model.embed_tokens(ids[:, 1:])  # the next token at each position
        x = torch.cat([norms["emb"](embeds), norms["hidden"](hidden)], dim=-1)
        x = x @ tensors["model.mtp_linear_proj.0.weight"].T
        positions = torch.arange(x.shape[1]).unsqueeze(0)
        mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)[None, None]
        y = block(x, attention_mask=mask, position_ids=positions,
                  position_embeddings=model.model.rotary_emb(x, positions))  # fmt: skip
        logits = model.lm_head(model.model.norm(y))
    return logits[0].argmax(-1).tolist()


def _simulated_k1(prompt_len: int, sequence: list[int], drafts: list[int]) -> tuple[int, int]:
    """(drafted, accepted) of greedy k = 1 speculation over ``sequence``: after each step the
    draft for the token after the newest one comes from the position before the newest."""
    drafted = accepted = 0
    newest = prompt_len  # the first generated token (from the prefill)
    while newest + 1 < len(sequence):
        drafted += 1
        if drafts[newest - 1] == sequence[newest + 1]:
            accepted += 1
            newest += 2
        else:
            newest += 1
    return drafted, accepted


@pytest.fixture(scope="module")
def partly_agreeing(prompts, tmp_path_factory):
    """The partly agreeing head with its plain and k = 1 runs (TP = 1)."""
    tmp = tmp_path_factory.mktemp("mtp-partly")
    model = _partly_agreeing_head(make_tiny_checkpoint(tmp / "m", "legacy", with_tokenizer=False, mtp_agree=True))
    return {"model": model, "plain": greedy(model, tmp, "plain", prompts, EAGER),
            "k1": greedy(model, tmp, "k1", prompts, mtp(1))}  # fmt: skip


def test_draft_agrees_with_the_reference_mtp_head(partly_agreeing, prompts):
    """vLLM's accepted-token count with the plugin's draft equals the count a reference MTP
    head (HF's ERNIE layers, the training code's layout) gives on the same greedy sequences."""
    model, plain, spec = partly_agreeing["model"], partly_agreeing["plain"], partly_agreeing["k1"]
    assert tokens(spec) == tokens(plain)
    expected = {True: [0, 0], False: [0, 0]}  # pre_norm -> [accepted, drafted]
    for prompt, output in zip(json.loads(prompts.read_text()), tokens(plain)):
        sequence = prompt + output
        for pre_norm in (True, False):
            drafts = _reference_drafts(model, sequence, pre_norm)
            drafted, accepted = _simulated_k1(len(prompt), sequence, drafts)
            expected[pre_norm][0] += accepted
            expected[pre_norm][1] += drafted
    counts = spec["spec_decode"]
    assert 0 < expected[True][0] < expected[True][1]  # the head agrees only in part
    assert expected[True] != expected[False]  # the check tells pre-norm from post-norm input
    assert [counts["accepted_tokens"], counts["drafts"]] == expected[True]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor_parallel_size=2 on CPU needs 2 cores")
def test_lossless_under_tensor_parallel_2(partly_agreeing, prompts, tmp_path):
    """TP = 2 (the draft's layer and the shared head sharded like the target's), k = 2: the
    partly agreeing head accepts some drafts and rejects others in one run, and the tokens are
    those of the TP = 1 engine without speculation."""
    result = greedy(partly_agreeing["model"], tmp_path, "tp2", prompts, mtp(2, tensor_parallel_size=2))
    assert tokens(result) == tokens(partly_agreeing["plain"])
    assert 0 < acceptance(result) < 1, result["spec_decode"]
