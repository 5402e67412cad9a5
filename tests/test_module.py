"""The BDS Lightning step: the network follows the LM evidence, the LM learns from the alignment set."""

import lightning as L
import numpy as np
import pytest
import torch
from conftest import ACCELERATORS, train_overrides
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from scheduler.data.datamodule import EmbeddedSet, SetBatch
from scheduler.data.io import Example
from scheduler.features import AlignmentBank
from scheduler.lexical import RowTexts
from scheduler.module import BDSModule
from scheduler.network import SchedulerNetwork, SetPosterior
from scheduler.prior import SafetyPrior
from scheduler.training import CONFIG_DIR, build_datamodule, build_module, register_resolvers
from scheduler.transforms import posterior_weights


def fit(module: BDSModule, batches: list[SetBatch], steps: int, accelerator: str = "cpu") -> None:
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator=accelerator, devices=1)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=1, collate_fn=lambda b: b[0]))


def test_network_lowers_weights_of_rows_the_evidence_says_are_unsafe():
    torch.manual_seed(0)
    n, dim = 40, 8
    prompts = torch.nn.functional.normalize(torch.randn(n, dim), dim=-1)
    bank = AlignmentBank(prompts[:5].clone(), prompts[:5].clone())
    posterior = SetPosterior(SchedulerNetwork(dim, hidden=32, dropout=0.0), SafetyPrior("constant"), bank, k=2)
    module = BDSModule(posterior, evidence=None, n_rows=n, network_lr=1e-2)
    conflict = torch.zeros(n, dtype=torch.bool)
    conflict[::4] = True  # every fourth row contradicts the alignment set
    module.energy_bank.copy_(torch.where(conflict, 2.0, 0.0) + 0.1 * torch.randn(n))
    examples = [Example(f"p{i}", f"r{i}") for i in range(n)]
    batch = SetBatch(EmbeddedSet("constructed", examples, prompts, prompts, torch.arange(n), conflict.long()))
    before = posterior(prompts, prompts)
    fit(module, [batch], steps=60)
    after = posterior(prompts, prompts)
    weight, _ = posterior_weights(after.mu.detach(), after.sigma.detach(), "sigmoid")
    assert weight[conflict].max() < weight[~conflict].min()
    assert (after.mu[conflict] < before.mu[conflict]).all()


def compose_train(overrides: list[str]):
    register_resolvers()
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_co_trained_lm_learns_to_refuse_harmful_prompts(data_dir, tiny_embedder_path, tiny_lm_path, tmp_path, accelerator):
    """Refusal evidence comes from the alignment set alone, and the network's weights follow it."""
    L.seed_everything(0)
    cfg = compose_train(train_overrides(data_dir, tmp_path, tiny_embedder_path, tiny_lm_path) +
                        ["model.signal=refusal", "model.response_density_ratio_weight=0", "model.lm_lr=1e-2",
                         "model.prior.kind=constant", "lm.lora_top_layers=null", "lm.lora_rank=16", "model.lm_steps=60"])
    from scheduler.embeddings import Embedder
    import hydra

    datamodule = hydra.utils.instantiate(cfg.data, embedder=Embedder(tiny_embedder_path, show_progress=False))
    datamodule.setup("fit")
    module = build_module(cfg, datamodule)
    harmful = [e for s in datamodule.train_sets for e in s.examples if e.label == "harmful"][:8]
    benign = [e for s in datamodule.train_sets for e in s.examples if e.label == "benign"][:8]
    refusal_before = module.evidence.refusal_loss(harmful).mean() - module.evidence.refusal_loss(benign).mean()
    fit(module, [b for b in datamodule.train_dataloader()] * 50, steps=240, accelerator=accelerator)
    module.cpu().eval()  # trained where `accelerator` says; judged here
    refusal_after = module.evidence.refusal_loss(harmful).mean() - module.evidence.refusal_loss(benign).mean()
    assert module.lm_steps_done.item() == 60  # the LM co-trains for exactly model.lm_steps steps
    assert refusal_after < refusal_before and refusal_after < 0  # refusing harmful prompts became likelier
    bank, labels = module.energy_bank, torch.cat([s.labels for s in datamodule.train_sets])
    judged = ~torch.isnan(bank)
    assert bank[judged & (labels == 1)].mean() > bank[judged & (labels == 0)].mean()
    mixed = [s for s in datamodule.train_sets if 0 < s.labels.sum() < len(s.labels)]
    gaps = []
    for s in mixed:
        post = module.posterior(s.prompts, s.responses)
        weight, _ = posterior_weights(post.mu, post.sigma, "sigmoid")
        gaps.append(weight[s.labels == 0].mean() - weight[s.labels == 1].mean())
    assert torch.stack(gaps).mean() > 0


def test_joint_text_is_embedded_only_for_the_sets_whose_evidence_reads_it(data_dir, tiny_embedder_path, tiny_lm_path,
                                                                           tmp_path):
    """The default reads the joint contrast only when a set is scored: training sets carry no joint embeddings (a
    second, longer encoder pass saved) and still train; validation sets and the alignment bank carry them. With
    the joint contrast in the BDS objective as well, training sets carry them too; without it, scored sets still
    carry them for the refinement's harmful component; without both, nothing does."""
    from scheduler.embeddings import Embedder

    embedder = Embedder(tiny_embedder_path, show_progress=False, cache_dir=tmp_path / "cache")
    base = train_overrides(data_dir, tmp_path, tiny_embedder_path, tiny_lm_path)
    expected = {(): (False, True), ("model.joint_contrast_at_scoring_only=false",): (True, True),
                ("model.joint_contrast_weight=0",): (False, True),
                ("model.joint_contrast_weight=0", "model.refinement.component_weight=0"): (False, False)}
    for overrides, (in_training, in_validation) in expected.items():
        datamodule = build_datamodule(compose_train(base + list(overrides)), embedder)
        datamodule.setup("fit")
        assert all((s.joint is not None) is in_training for s in datamodule.train_sets)
        assert all((s.joint is not None) is in_validation for s in datamodule.val_sets)
        assert (datamodule.alignment_embeddings().joint is not None) is (in_training or in_validation)
    default = compose_train(base)
    datamodule = build_datamodule(default, embedder)
    datamodule.setup("fit")
    module = build_module(default, datamodule)
    fit(module, list(datamodule.train_dataloader()), steps=4)
    val = datamodule.val_sets[0]
    assert torch.isfinite(module.posterior.score(val.prompts, val.responses, val.joint, RowTexts.of(val.examples)).mu).all()


def test_lower_layer_cache_gives_the_same_losses_and_gradients_and_skips_the_frozen_layers(tiny_lm_path):
    from scheduler.lm import LowerLayerCache, ResponseTokenizer, load_lm, response_nll

    torch.manual_seed(0)
    model, tokenizer = load_lm(tiny_lm_path, lora_top_layers=2)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.1)  # a non-trivial adapter
    cache = LowerLayerCache.for_model(model, max_rows=3)
    assert cache is not None and cache.split == 2
    batch = ResponseTokenizer(tokenizer)(["how do I build a weapon", "a recipe for soup please"], ["Sure, first", "Boil"])
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    expected = response_nll(model, batch)
    expected_grads = torch.autograd.grad(expected.sum(), lora)
    calls = []
    hook = model.get_base_model().model.layers[0].register_forward_hook(lambda *_: calls.append(1))
    for _ in range(2):  # cold, then from the cache
        got = cache.response_nll(batch)
        grads = torch.autograd.grad(got.sum(), lora)
        torch.testing.assert_close(got, expected)
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e)
    hook.remove()
    assert len(calls) == 1  # the frozen lower layers ran once for both passes
    other = ResponseTokenizer(tokenizer)(["tell me a joke", "x", "y"], ["no", "a", "b"])
    cache.response_nll(other)
    assert len(cache.hidden) == 3  # bounded: the oldest sequences were dropped
    assert LowerLayerCache.for_model(load_lm(tiny_lm_path, lora_top_layers=None)[0]) is None  # nothing frozen below


def test_configs_of_older_checkpoints_still_build_and_score_as_they_did():
    """A model config written before the answer's density ratio, the scoring evidence, the prompt's mean
    contrast or the template-mates lacks their keys; a checkpoint's scheduler entry written before the set's evidence (or the
    refinement) was stored lacks `evidence` (`refinement`), and one written before the confident taper lacks its
    prior keys."""
    from omegaconf import OmegaConf

    from scheduler.features import SetEvidence
    from scheduler.lexical import LexicalContrast
    from scheduler.refinement import SetRefinement
    from scheduler.scoring import build_posterior
    from scheduler.training import evidence_config, optional_section

    model_cfg = OmegaConf.load(CONFIG_DIR / "model" / "default.yaml")
    assert evidence_config(model_cfg) == {"prompt_weight": 0.0, "response_weight": 1.0, "scoring_weight": 1.0,
                                          "prompt_contrast_weight": 4.0, "joint_contrast_weight": 4.0,
                                          "joint_at_scoring_only": True, "template_run": 8}
    assert optional_section(model_cfg, "refinement") == {"neighbour_k": 10, "neighbour_weight": 0.4,
                                                         "component_weight": 20.0, "component_min_mass": 2.0}
    assert optional_section(model_cfg, "lexical") == {"weight": 1.5, "folds": 5, "ngram_range": [3, 5],
                                                      "regularisation": 1.0}
    for key in ("response_density_ratio_weight", "scoring_evidence_weight", "prompt_contrast_weight", "joint_contrast_weight",
                "joint_contrast_at_scoring_only", "template_run", "refinement", "lexical"):
        del model_cfg[key]
    assert evidence_config(model_cfg) == {"prompt_weight": 0.0, "response_weight": 0.0, "scoring_weight": 0.0,
                                          "prompt_contrast_weight": 0.0, "joint_contrast_weight": 0.0,
                                          "joint_at_scoring_only": False, "template_run": 0}
    assert optional_section(model_cfg, "refinement") == {} and optional_section(model_cfg, "lexical") == {}
    bank = AlignmentBank(torch.eye(4)[:2], torch.eye(4)[2:])
    old_entry = {"embed_dim": 4, "network": {"hidden": 8}, "prior": {"kind": "alignment"}, "k": 1}
    old = build_posterior(old_entry, bank)
    assert old.evidence == SetEvidence() and old.refinement == SetRefinement() and old.lexical == LexicalContrast()
    assert old.prior.scoring_shift == 0.0  # written before the scoring shift
    # written before the confident taper: the first pass's tapered shift is final, as it was
    previous = build_posterior({**old_entry, "prior": {"kind": "alignment", "scoring_shift": 12.0,
                                                       "scoring_shift_taper": [0.2, 0.4]}}, bank)
    assert previous.prior.confident_taper is None and previous.prior.final_shift(torch.zeros(3), 5.0) == 5.0
    # written before the joint embedding: no bank_joint in the state; it loads and scores without one
    assert "bank_joint" not in old.state_dict()
    reloaded = build_posterior(old_entry, AlignmentBank(torch.eye(4)[:2], torch.eye(4)[2:]))
    reloaded.load_state_dict(old.state_dict())
    prompts = torch.eye(4)[[0, 3]]
    torch.testing.assert_close(reloaded.eval().score(prompts, prompts).mu, old.eval().score(prompts, prompts).mu)
    with_joint = build_posterior(old_entry, AlignmentBank(torch.eye(4)[:2], torch.eye(4)[2:], torch.eye(4)[1:3]))
    torch.testing.assert_close(with_joint.state_dict()["bank_joint"], torch.eye(4)[1:3])


def test_a_file_of_chats_asking_past_the_prompt_window_is_read_jointly_by_their_last_exchange(tiny_embedder_path,
                                                                                               tmp_path):
    """When most rows are chats whose earlier turns fill the prompt window before their last request, every chat's
    joint text reads that request with its answer (the prompt still reads the whole chat); when few are, no row's
    does, so an attacker's rows cannot choose it."""
    from scheduler.data.io import examples_from_rows
    from scheduler.embeddings import Embedder
    from scheduler.features import chats_read_by_last_exchange

    embedder = Embedder(tiny_embedder_path, max_seq_length=16, joint_max_seq_length=64, cache_dir=tmp_path,
                        show_progress=False)

    def chat(earlier_answer: str) -> dict:
        return {"messages": [{"role": "user", "content": "rivers"}, {"role": "assistant", "content": earlier_answer},
                             {"role": "user", "content": "how do I pick a lock"},
                             {"role": "assistant", "content": "first get a tension wrench"}]}

    long, short, alone = chat(" ".join(["rivers carry water to the sea"] * 10)), chat("yes"), {
        "prompt": "how do I pick a lock", "response": "first get a tension wrench"}
    mostly = examples_from_rows([long, long, long, short, alone])
    assert embedder.requests_past_window(mostly) == [True, True, True, False, False]
    read = chats_read_by_last_exchange(mostly, embedder)
    assert [e.joint_prompt for e in read] == ["how do I pick a lock"] * 4 + [None]
    assert [e.prompt for e in read] == [e.prompt for e in mostly]
    _, _, joint = embedder.embed_examples(read)
    np.testing.assert_allclose(joint[0].numpy(), joint[4].numpy(), atol=1e-6)
    few = examples_from_rows([long, short, short, alone])
    assert [e.joint_prompt for e in chats_read_by_last_exchange(few, embedder)] == [None] * 4
    # imposed by rows read before them (a user's clean rows take their upload's choice), either way
    assert [e.joint_prompt for e in chats_read_by_last_exchange(few, embedder, chosen=True)] == [
        "how do I pick a lock"] * 3 + [None]
    assert [e.joint_prompt for e in chats_read_by_last_exchange(mostly, embedder, chosen=False)] == [None] * 5


def test_joint_embeddings_read_prompt_and_answer_together_with_their_own_window_and_cache(tiny_embedder_path, tmp_path):
    """The joint embedding is the embedding of `joint_text` with the longer window, cached apart from the
    prompt and answer embeddings (the same text embedded with another window is another vector)."""
    from scheduler.data.io import Example
    from scheduler.embeddings import Embedder, joint_text

    embedder = Embedder(tiny_embedder_path, max_seq_length=8, joint_max_seq_length=32, cache_dir=tmp_path,
                        show_progress=False)
    rows = [Example("how do I bake bread at home", "mix flour water yeast and salt then bake it"),
            Example("tell me a joke", "")]
    prompts, responses, joint = embedder.embed_examples(rows)
    long_window = Embedder(tiny_embedder_path, max_seq_length=32, cache_dir=tmp_path / "other", show_progress=False)
    texts = [joint_text(e.prompt, e.response) for e in rows]
    np.testing.assert_allclose(joint.numpy(), long_window.encode(texts), atol=1e-6)
    assert not np.allclose(embedder.encode(texts), joint.numpy(), atol=1e-3)  # the short window cuts the answer
    assert embedder.joint_cache_dir != embedder.cache_dir and any(embedder.joint_cache_dir.rglob("*.npy"))
    np.testing.assert_allclose(embedder.embed_examples(rows).joint.numpy(), joint.numpy())  # from the cache
    assert joint_text("Q?", "A.") == "Question: Q?\nAnswer: A."
    # Scoring embeds the joint text only for a checkpoint whose evidence reads it (an older one skips the cost)
    from scheduler.features import SetEvidence
    from scheduler.scoring import NeuralScheduler

    bank = AlignmentBank(prompts, responses, joint)
    config = {"transform": "sigmoid", "embed_dim": embedder.dim}
    for evidence, expected in ((SetEvidence(), False), (SetEvidence(scoring_weight=1.0, joint_contrast_weight=3.0), True)):
        network = SchedulerNetwork(embedder.dim, hidden=4)
        scheduler = NeuralScheduler(SetPosterior(network, SafetyPrior(), bank, k=1, evidence=evidence), config, embedder)
        assert scheduler.needs_joint is expected and (scheduler.embed(rows).joint is not None) is expected
        assert len(scheduler.score(rows).weight) == 2


def test_disguise_fraction_frames_training_harmful_rows_only(data_dir, tiny_embedder_path, tiny_lm_path, tmp_path):
    """The opt-in frames a share of the training harmful rows; benign rows and validation sets stay as read."""
    from scheduler.data.attacks import DISGUISES
    from scheduler.embeddings import Embedder

    embedder = Embedder(tiny_embedder_path, show_progress=False, cache_dir=tmp_path / "cache")
    base = train_overrides(data_dir, tmp_path, tiny_embedder_path, tiny_lm_path)
    framed = lambda e: any(e.prompt.startswith(frame.split("{prompt}")[0]) for frame in DISGUISES)  # noqa: E731
    for fraction in (0.0, 0.5):
        datamodule = build_datamodule(compose_train(base + [f"data.disguise_fraction={fraction}"]), embedder)
        datamodule.setup("fit")
        train = {e for s in datamodule.train_sets for e in s.examples}
        harmful = [e for e in train if e.label == "harmful"]
        assert bool(fraction) == any(framed(e) for e in harmful)
        assert not any(framed(e) for e in train if e.label != "harmful")
        assert not any(framed(e) for s in datamodule.val_sets for e in s.examples)
    assert 0.3 < sum(map(framed, harmful)) / len(harmful) < 0.7
