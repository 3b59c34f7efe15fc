"""Causality of the decoder LM and padding invariance of both models."""

from __future__ import annotations

import pytest
import torch

from .conftest import tiny


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_lm_is_causal(positions):
    cfg, model = tiny("lm/debug", f"model.positions={positions}")
    model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 12), generator=g)
    out = model(ids).hidden
    for t in (0, 5, 10):
        changed = ids.clone()
        changed[:, t + 1:] = torch.randint(0, cfg.model.vocab_size, (2, 11 - t), generator=g)
        new = model(changed).hidden
        torch.testing.assert_close(new[:, : t + 1], out[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(new[:, t + 1:], out[:, t + 1:])


@pytest.mark.parametrize("side", ["right", "left"])
def test_lm_padding_does_not_change_real_tokens(side):
    cfg, model = tiny("lm/debug")
    model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.model.vocab_size, (3, 10), generator=g)
    padding = torch.zeros(3, 10, dtype=torch.bool)
    pad = slice(7, None) if side == "right" else slice(0, 3)
    padding[1, pad] = True
    out = model(ids, padding)
    assert torch.isfinite(out.hidden).all()
    changed = ids.clone()
    changed[1, pad] = torch.randint(0, cfg.model.vocab_size, (3,), generator=g)
    new = model(changed, padding)
    torch.testing.assert_close(new.hidden[~padding], out.hidden[~padding], rtol=0, atol=1e-6)
    # without the mask, the padded ids would matter
    if side == "left":
        assert not torch.allclose(model(changed).hidden[1, 3:], model(ids).hidden[1, 3:])
    else:
        torch.testing.assert_close(model(ids).hidden[1, :7], out.hidden[1, :7], rtol=0, atol=1e-6)


@pytest.mark.parametrize("preset", ["beit3/debug", "beit3/debug_paper"])
@pytest.mark.parametrize("with_images", [False, True])
def test_encoder_padding_does_not_change_real_tokens(preset, with_images):
    cfg, model = tiny(preset)
    c = cfg.model
    model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, c.vocab_size, (2, 9), generator=g)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[0, 6:] = True
    images = torch.randn(2, 3, c.image_size, c.image_size, generator=g) if with_images else None
    out = model(images=images, text_ids=ids, text_padding_mask=padding)
    changed = ids.clone()
    changed[0, 6:] = torch.randint(0, c.vocab_size, (3,), generator=g)
    new = model(images=images, text_ids=changed, text_padding_mask=padding)
    real = out.token_mask
    assert real.shape == out.hidden.shape[:2] and real.sum() == real.numel() - 3
    torch.testing.assert_close(new.hidden[real], out.hidden[real], rtol=0, atol=1e-6)
    # the unmasked model does see the change (the test would notice a mask that is ignored)
    assert not torch.allclose(model(images=images, text_ids=changed).hidden[0, :-3],
                              model(images=images, text_ids=ids).hidden[0, :-3])
    # a shorter batch without the padding gives the same real-token outputs
    short = model(images=images[:1] if with_images else None, text_ids=ids[:1, :6])
    torch.testing.assert_close(short.hidden[0], out.hidden[0][real[0]], rtol=0, atol=1e-5)
