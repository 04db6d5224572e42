"""Deactivation modules: plain reference, relation between the forms, hooks, ONNX export."""
from __future__ import annotations

import pytest
import torch

from surgery.sae import (
    SAEConfig,
    SAEError,
    Site,
    SparseAutoencoder,
    deactivation,
    replaced,
)

IDS = [1, 5, 9]


def _sae(kind: str) -> SparseAutoencoder:
    sae = SparseAutoencoder(SAEConfig(d_in=6, expansion=3, kind=kind, k=4, normalisation="standard"))
    sae.reset_parameters(torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(18, generator=gen))
        sae.b_dec.copy_(0.2 * torch.randn(6, generator=gen))
        sae.shift.copy_(torch.randn(6, generator=gen))
        sae.scale.copy_(torch.rand(6, generator=gen) + 0.5)
        sae.threshold.fill_(0.1)
    return sae.eval()


def _reference_codes(sae: SparseAutoencoder, h: torch.Tensor) -> torch.Tensor:
    """Plain per-row, per-latent loops."""
    rows = h.reshape(-1, h.shape[-1])
    out = torch.zeros(rows.shape[0], sae.cfg.width)
    for r, x in enumerate(rows):
        x_n = (x - sae.shift) / sae.scale
        pre = torch.stack([((x_n - sae.b_dec) * sae.W_enc[:, i]).sum() + sae.b_enc[i] for i in range(sae.cfg.width)])
        if sae.cfg.kind == "relu":
            z = pre.clamp_min(0)
        elif sae.cfg.kind == "batchtopk":
            z = torch.where(pre > sae.threshold, pre, torch.zeros(()))
        else:
            keep = set(pre.argsort(descending=True)[: sae.cfg.k].tolist())
            z = torch.tensor([max(float(pre[i]), 0.0) if i in keep else 0.0 for i in range(sae.cfg.width)])
        out[r] = z
    return out.reshape(*h.shape[:-1], sae.cfg.width)


@pytest.mark.parametrize("kind", ["relu", "topk", "batchtopk"])
@pytest.mark.parametrize("alpha", [0.6, 1.0])
def test_both_forms_equal_plain_reference(kind, alpha):
    sae = _sae(kind)
    h = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(2))  # (B, N, D)
    with torch.no_grad():
        z = _reference_codes(sae, h)
        z_masked = z.clone()
        z_masked[..., IDS] = 0
        recon = (z_masked @ sae.W_dec + sae.b_dec) * sae.scale + sae.shift
        paper_ref = (1 - alpha) * h + alpha * recon
        ep_ref = h.clone()
        for i in IDS:
            ep_ref = ep_ref - alpha * z[..., i:i + 1] * sae.W_dec[i] * sae.scale
        torch.testing.assert_close(deactivation(sae, IDS, alpha, "paper")(h), paper_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(deactivation(sae, IDS, alpha, "error_preserving")(h), ep_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["relu", "topk", "batchtopk"])
def test_paper_form_is_error_preserving_form_minus_alpha_times_error(kind):
    """Exact algebra: paper(h) = ep(h) - a * (h - sae(h)), so they agree iff sae(h) == h (or a == 0)."""
    sae = _sae(kind)
    h = torch.randn(7, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for a in (0.0, 0.6, 1.0):
            paper, ep = deactivation(sae, IDS, a, "paper")(h), deactivation(sae, IDS, a, "error_preserving")(h)
            torch.testing.assert_close(paper, ep - a * (h - sae(h)), atol=1e-5, rtol=1e-5)
        assert (deactivation(sae, IDS, 1.0, "paper")(h) - deactivation(sae, IDS, 1.0, "error_preserving")(h)).abs().max() > 1e-3


def test_forms_agree_when_reconstruction_is_perfect():
    """Tied SAE with orthonormal decoder rows (F <= D), relu, no bias: h = b_dec + z W_dec with z >= 0
    is encoded back to z, so sae(h) == h and the two forms give the same h'."""
    cfg = SAEConfig(d_in=8, expansion=1, kind="relu", normalisation="none")
    sae = SparseAutoencoder(cfg).eval()
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(4)))
    with torch.no_grad():
        sae.W_dec.copy_(q.T)
        sae.W_enc.copy_(q)
        sae.b_dec.copy_(torch.randn(8))
        sae.b_enc.zero_()
        z = torch.rand(5, 8) * (torch.rand(5, 8) > 0.5)
        h = sae.b_dec + z @ sae.W_dec
        torch.testing.assert_close(sae(h), h, atol=1e-5, rtol=1e-5)
        for a in (0.6, 1.0):
            torch.testing.assert_close(deactivation(sae, [0, 3], a, "paper")(h),
                                       deactivation(sae, [0, 3], a, "error_preserving")(h), atol=1e-5, rtol=1e-5)


def test_error_preserving_keeps_only_the_selected_rows():
    ep = deactivation(_sae("batchtopk"), IDS, 0.6, "error_preserving")
    assert ep.W_dec_S.shape == (3, 6) and ep.W_enc_S.shape == (6, 3)
    assert not hasattr(ep, "W_enc")
    full = deactivation(_sae("topk"), IDS, 0.6, "error_preserving")  # a TopK SAE needs the whole encoder
    assert full.W_enc.shape == (6, 18)


def test_bad_ids_alpha_and_form():
    sae = _sae("relu")
    with pytest.raises(SAEError, match="outside"):
        deactivation(sae, [18])
    with pytest.raises(SAEError, match="alpha"):
        deactivation(sae, [1], alpha=1.5)
    with pytest.raises(SAEError, match="paper, error_preserving"):
        deactivation(sae, [1], form="exact")


@pytest.mark.parametrize("where", ["residual", "embedding"])
def test_replaced_hooks_the_site(tiny, images, tokens, where):
    model, _cfg = tiny
    with torch.no_grad():
        before_img, before_txt = model.encode_image(images), model.encode_text(tokens)
        with replaced(model, Site("vision", where), lambda h: h):
            torch.testing.assert_close(model.encode_image(images), before_img)
        with replaced(model, Site("vision", where), lambda h: 2 * h):
            changed = model.encode_image(images)
        if where == "embedding":
            torch.testing.assert_close(changed, 2 * before_img)
        else:  # by hand: double the ln_post input, then pool and project
            v = model.visual
            grabbed = []
            handle = v.ln_post.register_forward_pre_hook(lambda _m, a: grabbed.append(a[0]))
            model.encode_image(images)
            handle.remove()
            torch.testing.assert_close(changed, v.ln_post(2 * grabbed[0])[:, 0] @ v.proj)
        with replaced(model, Site("text", where), lambda h: h * 0.5):
            changed_txt = model.encode_text(tokens)
        assert not torch.allclose(changed_txt, before_txt)
        torch.testing.assert_close(model.encode_text(tokens), before_txt)  # hook removed
        torch.testing.assert_close(model.encode_image(images), before_img)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("form", ["paper", "error_preserving"])
def test_modules_export_to_onnx_and_match(tmp_path, form):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    module = deactivation(_sae("batchtopk"), IDS, 0.6, form)
    h = torch.randn(2, 5, 6)
    path = tmp_path / "m.onnx"
    torch.onnx.export(module, (h,), str(path), dynamo=False, input_names=["h"], output_names=["out"], opset_version=17)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ops <= {"Sub", "Div", "MatMul", "Add", "Mul", "Greater", "Cast", "Constant"}, ops
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"h": h.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), module(h), atol=1e-5, rtol=1e-5)
