"""SAE module: config validation, activations, normalisation, losses, save/load."""
from __future__ import annotations

import json

import pytest
import torch

from surgery.sae import (
    SAEConfig,
    SAEError,
    SparseAutoencoder,
    aux_k_loss,
    batch_topk_activation,
    explained_variance,
    geometric_median,
    load_sae,
    normalised_mse,
    save_sae,
    threshold_activation,
    topk_activation,
)
from surgery.sae.train import training_step


def _sae(kind="topk", d=8, expansion=4, k=3, **kw) -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=d, expansion=expansion, kind=kind, k=k, **kw))
    sae.reset_parameters(torch.Generator().manual_seed(0))
    return sae


@pytest.mark.parametrize("field,value,words", [
    ("kind", "gated", "batchtopk, topk, relu"),
    ("normalisation", "l2", "scalar, standard, none"),
    ("site", "mlp", "residual, embedding"),
])
def test_config_rejects_unknown_choices_listing_allowed(field, value, words):
    with pytest.raises(SAEError, match=words):
        SAEConfig(d_in=8, **{field: value})


def test_k_larger_than_width_is_a_clear_error():
    with pytest.raises(SAEError, match=r"k=40 is larger than the SAE width 32.*lower k or raise the expansion"):
        SAEConfig(d_in=8, expansion=4, k=40)
    SAEConfig(d_in=8, expansion=4, k=40, kind="relu")  # relu has no k


def test_config_roundtrip_and_matryoshka_validation():
    cfg = SAEConfig(d_in=8, expansion=4, k=3, matryoshka=(4, 16))
    assert SAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(SAEError, match="matryoshka"):
        SAEConfig(d_in=8, expansion=4, matryoshka=(16, 4))


def test_activations():
    pre = torch.tensor([[3.0, -1.0, 2.0, 0.5], [0.1, 0.2, -5.0, 4.0]])  # (B=2, F=4)
    assert torch.equal(topk_activation(pre, 2), torch.tensor([[3.0, 0, 2.0, 0], [0, 0.2, 0, 4.0]]))
    # batch top-k keeps k * B = 4 largest over the whole batch
    assert torch.equal(batch_topk_activation(pre, 2), torch.tensor([[3.0, 0, 2.0, 0.5], [0, 0, 0, 4.0]]))
    assert torch.equal(threshold_activation(pre, torch.tensor(0.5)), torch.tensor([[3.0, 0, 2.0, 0], [0, 0, 0, 4.0]]))
    # topk never passes a negative value on
    assert (topk_activation(-pre.abs(), 2) == 0).all()


def test_encode_decode_forward_shapes_and_math():
    sae = _sae("topk").eval()
    x = torch.randn(2, 5, 8)  # (B, N, D): works on any leading dims
    z = sae.encode(x)
    assert z.shape == (2, 5, 32) and ((z != 0).sum(-1) <= 3).all()
    x_n = (x - sae.shift) / sae.scale
    pre = (x_n - sae.b_dec) @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(sae.pre_activations(x), pre)
    torch.testing.assert_close(sae.decode(z), (z @ sae.W_dec + sae.b_dec) * sae.scale + sae.shift)
    torch.testing.assert_close(sae(x), sae.decode(z))


def test_batchtopk_uses_batch_topk_in_training_and_threshold_at_inference():
    sae = _sae("batchtopk")
    x = torch.randn(16, 8)
    sae.train()
    z = sae.encode(x)
    assert int((z > 0).sum()) <= 3 * 16
    sae.update_threshold_(z)
    assert float(sae.threshold) == float(z.detach()[z > 0].min())  # first batch sets it
    sae.eval()
    pre = sae.pre_activations(x)
    torch.testing.assert_close(sae.encode(x), pre * (pre > sae.threshold))


def test_normalisation_modes():
    x = torch.randn(500, 8) * 3 + 2
    sae = _sae(normalisation="scalar")
    sae.fit_normalisation_(x)
    assert abs(float(sae.normalise(x).pow(2).sum(1).mean()) - 8) < 1e-3  # E||x_n||^2 = D
    sae = _sae(normalisation="standard")
    sae.fit_normalisation_(x)
    x_n = sae.normalise(x)
    torch.testing.assert_close(x_n.mean(0), torch.zeros(8), atol=1e-4, rtol=0)
    torch.testing.assert_close(x_n.std(0), torch.ones(8), atol=1e-4, rtol=0)


def test_geometric_median_ignores_an_outlier_and_b_dec_init():
    pts = torch.zeros(11, 8)
    pts[:, 0] = torch.arange(11.0) * 0.01
    pts[-1] = 1000.0
    med = geometric_median(pts)
    assert med.norm() < 0.2 and pts.mean(0).norm() > 50
    sae = _sae(normalisation="none")
    sae.init_b_dec_(pts, "mean")
    torch.testing.assert_close(sae.b_dec.detach(), pts.mean(0))
    sae.init_b_dec_(pts, "geometric_median")
    torch.testing.assert_close(sae.b_dec.detach(), med)
    with pytest.raises(SAEError, match="geometric_median, mean, zeros"):
        sae.init_b_dec_(pts, "median")


def test_decoder_unit_norm_and_parallel_gradient_removal():
    sae = _sae("topk").train()
    training_step(sae, torch.randn(32, 8), torch.zeros(32, dtype=torch.long)).loss.backward()
    sae.remove_parallel_gradient_()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalise_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))


def test_aux_k_loss():
    x_n, x_hat = torch.randn(4, 8), torch.randn(4, 8)
    pre = torch.randn(4, 32)
    W = torch.randn(32, 8)
    none_dead = torch.zeros(32, dtype=torch.bool)
    assert float(aux_k_loss(x_n, x_hat, pre, none_dead, W, 5)) == 0.0
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:3] = True
    # plain reference: top-2 of the dead latents' pre-activations (relu) reconstruct the residual
    ref = []
    for b in range(4):
        vals, idx = pre[b, :3].topk(2)
        e_hat = (torch.relu(vals)[:, None] * W[idx]).sum(0)
        ref.append((e_hat - (x_n[b] - x_hat[b])).pow(2).sum())
    torch.testing.assert_close(aux_k_loss(x_n, x_hat, pre, dead, W, 2), torch.stack(ref).mean())


def test_reconstruction_metrics():
    x = torch.randn(100, 8)
    assert normalised_mse(x, x) == 0.0 and explained_variance(x, x) == 1.0
    assert abs(normalised_mse(x, x.mean(0).expand_as(x)) - 1.0) < 1e-6


def test_matryoshka_partials():
    sae = _sae("batchtopk", matryoshka=(4, 16)).train()
    out = sae.run(torch.randn(6, 8), batch_topk=True)
    assert out.aux["matryoshka"].shape == (2, 6, 8)
    torch.testing.assert_close(out.aux["matryoshka"][0], out.z[:, :4] @ sae.W_dec[:4] + sae.b_dec)


def test_save_load_roundtrip(tmp_path):
    sae = _sae("batchtopk", normalisation="standard")
    sae.fit_normalisation_(torch.randn(50, 8) + 1)
    with torch.no_grad():
        sae.threshold.fill_(0.25)
    save_sae(sae, str(tmp_path / "s"), {"note": 1})
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["cfg.json", "weights.safetensors"]
    loaded = load_sae(str(tmp_path / "s"))
    assert loaded.cfg == sae.cfg and not loaded.training
    for key, value in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    (tmp_path / "s" / "cfg.json").write_text("{")
    with pytest.raises(SAEError, match="not valid JSON"):
        load_sae(str(tmp_path / "s"))
    with pytest.raises(SAEError, match="no cfg.json"):
        load_sae(str(tmp_path))
