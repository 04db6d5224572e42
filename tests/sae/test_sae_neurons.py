"""Social-neuron search: seed 001's rule, the ranked score, images/texts front ends, bad input."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import labelled_image_folder

from surgery.io.checkpoint import state_dict_hash
from surgery.model.preprocess import default_preprocess, image_transform
from surgery.sae import (
    NeuronError,
    NeuronOptions,
    SAEConfig,
    SAEError,
    SparseAutoencoder,
    find_neurons,
    group_prompt_texts,
    neurons_from_images,
    neurons_from_texts,
    read_neurons,
    sample_latents,
    write_neurons,
)


def _latents():
    """6 samples, groups [0,0,0,1,1,1]; latent 0: group 0 only; 1: group 1 only (2 of 3);
    2: everyone; 3: group 0 on all + group 1 on one; 4: never."""
    z = torch.zeros(6, 5)
    z[:3, 0] = 1.0
    z[3:5, 1] = 2.0
    z[:, 2] = 0.5
    z[:3, 3] = 1.0
    z[3, 3] = 1.0
    return z, [0, 0, 0, 1, 1, 1]


def test_rule_and_ranked_score():
    z, groups = _latents()
    report = find_neurons(z, groups, ["a", "b"], NeuronOptions(tau=0.6, top_n=2))
    assert report.rule == {"a": [0, 3], "b": [1]}  # latent 3 fires for b on 1/3 < tau: a-only by the rule
    assert report.samples_per_group == [3, 3]
    top_a = report.ranked["a"]
    assert [r["id"] for r in top_a] == [0, 3]  # 0: consistency 1 x specificity 1; 3: 1 x (0.75-0.5)/0.5
    assert top_a[0]["score"] == 1.0 and abs(top_a[1]["score"] - 0.5) < 1e-6
    assert report.ranked["b"][0] == {"id": 1, "score": pytest.approx(2 / 3, abs=1e-6),
                                     "consistency": pytest.approx(2 / 3, abs=1e-6), "specificity": 1.0,
                                     "freq_others": 0.0, "rule": True}
    assert report.selected == {"a": [0, 3], "b": [1]} and report.selected_ids == [0, 1, 3]
    # latent 2 (everyone) never scores; tau 0.9 drops latent 1 from b's rule (2/3 < 0.9)
    assert find_neurons(z, groups, ["a", "b"], NeuronOptions(tau=0.9)).rule["b"] == []


def test_one_group_and_no_latent_passing_tau_are_clear_errors():
    z, _ = _latents()
    with pytest.raises(NeuronError, match="attribute 'gender' has one group \\(a\\).*pick an attribute"):
        find_neurons(z, [0] * 6, ["a", "b"], attribute="gender")
    with pytest.raises(NeuronError, match=r"no latent is non-zero on >= tau=0.5.*highest: 0.000.*lower tau below"):
        find_neurons(torch.zeros(6, 5), [0, 0, 0, 1, 1, 1], ["a", "b"])
    with pytest.raises(SAEError, match="pooled, max, mean, first"):
        NeuronOptions(token_reduce="sum")


def _tiny_sae(model, d, tower, site, kind="relu"):
    sae = SparseAutoencoder(SAEConfig(d_in=d, expansion=2, kind=kind, k=4, tower=tower, site=site,
                                      model_hash=state_dict_hash(model)))
    sae.reset_parameters(torch.Generator().manual_seed(0))
    return sae.eval()


def test_sample_latents_token_reductions(tiny, images):
    model, _ = tiny
    sae = _tiny_sae(model, 64, "vision", "residual")
    pooled = sample_latents(model, sae, [images])
    first = sample_latents(model, sae, [images], "first")
    mx = sample_latents(model, sae, [images], "max")
    assert pooled.shape == (3, 128) and torch.equal(pooled, first)  # class-token pooling
    assert (mx >= first).all()


def test_neurons_from_images_and_json(tmp_path, tiny):
    model, cfg = tiny
    images_dir, labels = labelled_image_folder(tmp_path)
    sae = _tiny_sae(model, 32, "vision", "embedding")
    transform = image_transform(default_preprocess(cfg))
    report = neurons_from_images(model, sae, images_dir, labels, "colour", transform, NeuronOptions(tau=0.5))
    assert report.groups == ["blue", "red"] and report.samples_per_group == [6, 6]
    out = tmp_path / "neurons.json"
    write_neurons(report, str(out), {"model": "builtin:tiny"})
    data = read_neurons(str(out))
    assert data["selected_ids"] == report.selected_ids and data["sae"]["site"] == "embedding"
    with pytest.raises(Exception, match="labels have no column 'race'"):
        neurons_from_images(model, sae, images_dir, labels, "race", transform)


def test_sae_of_another_model_is_refused(tmp_path, tiny):
    model, cfg = tiny
    images_dir, labels = labelled_image_folder(tmp_path, 4)
    sae = _tiny_sae(model, 32, "vision", "embedding")
    sae.cfg.model_hash = "f" * 64
    with pytest.raises(SAEError, match="trained on another model"):
        neurons_from_images(model, sae, images_dir, labels, "colour", image_transform(default_preprocess(cfg)))


def test_neurons_from_texts(tiny):
    model, _ = tiny
    sae = _tiny_sae(model, 32, "text", "residual")
    prompts = group_prompt_texts(["woman", "man"])
    report = neurons_from_texts(model, sae, prompts, {"name": "openai-clip-bpe", "context_length": 16},
                                NeuronOptions(tau=0.5), attribute="gender")
    assert report.source == "texts" and report.samples_per_group == [4, 4]
    vision_residual = _tiny_sae(model, 64, "vision", "residual")
    with pytest.raises(SAEError, match="cannot read text"):
        neurons_from_texts(model, vision_residual, prompts, {"name": "openai-clip-bpe", "context_length": 16})


def test_read_neurons_rejects_other_files(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"schema": "other"}))
    with pytest.raises(Exception, match="schema"):
        read_neurons(str(path))
