"""Plain transformers of :mod:`ppl_kbnn.nn`: shapes, causality, DT token layout, padding, pretraining."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ppl_kbnn.nn import (
    DecisionTransformer,
    DTConfig,
    Transformer,
    TransformerConfig,
    pretrain,
)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is faster than several, and immune to a busy machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _dt_inputs(B: int, K: int, cfg: DTConfig, gen: torch.Generator):
    rtg = torch.randn(B, K, 1, generator=gen)
    states = torch.randn(B, K, cfg.state_dim, generator=gen)
    actions = torch.randn(B, K, cfg.act_dim, generator=gen)
    timesteps = torch.randint(0, cfg.max_ep_len, (B, K), generator=gen)
    return rtg, states, actions, timesteps


# ---------------------------------------------------------------------------------------------
# Transformer


@pytest.mark.parametrize(
    "kw", [{}, {"activation": "gelu", "n_head": 2, "n_layer": 2}, {"out_tanh": True, "d_model": 8, "n_head": 4}]
)
def test_transformer_shapes_and_modules(kw, gen):
    cfg = TransformerConfig(d_in=3, d_out=2, **kw)
    model = Transformer(cfg)
    y = model(torch.randn(4, 7, 3, generator=gen))
    assert y.shape == (4, 7, 2) and y.dtype == torch.float64
    if cfg.out_tanh:
        assert y.abs().max() < 1
    assert len(model.blocks) == cfg.n_layer
    attn = model.blocks[0].attn
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        lin = getattr(attn, name)
        assert type(lin) is nn.Linear and lin.in_features == lin.out_features == cfg.d_model
    mlp = model.blocks[0].mlp
    assert (mlp.fc.in_features, mlp.fc.out_features, mlp.proj.out_features) == (
        cfg.d_model,
        4 * cfg.d_model,
        cfg.d_model,
    )
    assert isinstance(mlp.act, nn.GELU if cfg.activation == "gelu" else nn.ReLU)
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())


def test_transformer_is_causal(gen):
    model = Transformer(TransformerConfig(d_in=3, d_out=2, n_layer=2, n_head=2, d_model=8))
    x = torch.randn(2, 6, 3, generator=gen)
    y = model(x)
    for t in range(6):
        x2 = x.clone()
        x2[:, t] += torch.randn(2, 3, generator=gen)
        y2 = model(x2)
        torch.testing.assert_close(y2[:, :t], y[:, :t], rtol=0, atol=1e-12)
        assert (y2[:, t] - y[:, t]).abs().max() > 1e-6


def test_transformer_prefix_consistency(gen):
    """Output at t on a length-T input equals the output on the prefix of length t+1 (same positions)."""
    model = Transformer(TransformerConfig(d_in=2, d_out=3, n_head=2, d_model=8))
    x = torch.randn(3, 9, 2, generator=gen)
    torch.testing.assert_close(model(x)[:, :4], model(x[:, :4]))


def test_transformer_errors():
    model = Transformer(TransformerConfig(d_in=3, d_out=1, max_len=5))
    with pytest.raises(ValueError, match="max_len=5"):
        model(torch.zeros(1, 6, 3))
    with pytest.raises(ValueError, match="d_in=3"):
        model(torch.zeros(1, 4, 2))
    with pytest.raises(ValueError, match="d_in=3"):
        model(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="divisible"):
        TransformerConfig(d_in=1, d_out=1, d_model=6, n_head=4)
    with pytest.raises(ValueError, match="activation"):
        TransformerConfig(d_in=1, d_out=1, activation="tanh")


# ---------------------------------------------------------------------------------------------
# Decision Transformer


DT_CFG = DTConfig(state_dim=3, act_dim=2, d_model=8, n_layer=2, n_head=2, max_ep_len=50, context=4)


def test_dt_shapes_and_modules(gen):
    model = DecisionTransformer(DT_CFG)
    y = model(*_dt_inputs(5, 4, DT_CFG, gen))
    assert y.shape == (5, 4, 2) and y.abs().max() < 1  # tanh on
    assert (model.embed_return.in_features, model.embed_state.in_features, model.embed_action.in_features) == (1, 3, 2)
    assert model.embed_timestep.num_embeddings == 50 and model.predict_action.out_features == 2
    # a shorter or longer K than the context also works in forward (no positional embedding over tokens)
    assert model(*_dt_inputs(1, 7, DT_CFG, gen)).shape == (1, 7, 2)
    no_tanh = DecisionTransformer(DTConfig(state_dim=3, act_dim=2, action_tanh=False, activation="gelu"))
    assert no_tanh.action_act is None and isinstance(no_tanh.blocks[0].mlp.act, nn.GELU)


@pytest.mark.parametrize("which", ["rtg", "state", "action"])
def test_dt_token_layout_and_causality(which, gen):
    """Prediction t is read at the state token: it sees R̂_{≤t}, s_{≤t}, a_{<t} and nothing later."""
    model = DecisionTransformer(DT_CFG)
    inputs = list(_dt_inputs(2, 4, DT_CFG, gen))
    y = model(*inputs)
    i = {"rtg": 0, "state": 1, "action": 2}[which]
    for t in range(4):
        changed = [x.clone() for x in inputs]
        changed[i][:, t] += 1.0 + torch.rand(changed[i][:, t].shape, generator=gen)
        y2 = model(*changed)
        first_affected = t + 1 if which == "action" else t
        torch.testing.assert_close(y2[:, :first_affected], y[:, :first_affected], rtol=0, atol=1e-12)
        if first_affected < 4:
            assert (y2[:, first_affected:] - y[:, first_affected:]).abs().amax(dim=(0, 2)).min() > 1e-8


def test_dt_timestep_embedding_matters(gen):
    model = DecisionTransformer(DT_CFG)
    rtg, s, a, ts = _dt_inputs(2, 4, DT_CFG, gen)
    assert (model(rtg, s, a, ts + 1) - model(rtg, s, a, ts))[:, 0].abs().max() > 1e-6


def test_dt_padding_mask_in_forward(gen):
    """Left padding + attention_mask reproduces the unpadded run at the real steps, whatever the padding holds."""
    model = DecisionTransformer(DT_CFG)
    rtg, s, a, ts = _dt_inputs(3, 4, DT_CFG, gen)
    n_pad = 2
    garbage = [torch.randn(3, n_pad, *x.shape[2:], generator=gen) for x in (rtg, s, a)]
    padded = [torch.cat([g, x], dim=1) for g, x in zip(garbage, (rtg, s, a), strict=True)]
    ts_pad = torch.cat([torch.randint(0, 50, (3, n_pad), generator=gen), ts], dim=1)
    mask = torch.cat([torch.zeros(3, n_pad), torch.ones(3, 4)], dim=1).bool()
    y_pad = model(*padded, ts_pad, attention_mask=mask)
    assert torch.isfinite(y_pad).all()
    torch.testing.assert_close(y_pad[:, n_pad:], model(rtg, s, a, ts))


def test_dt_get_action_matches_unpadded_forward(gen):
    model = DecisionTransformer(DT_CFG)
    rtg, s, a, ts = (x[0] for x in _dt_inputs(1, 7, DT_CFG, gen))  # one history of 7 steps
    for L in range(1, 8):
        act = model.get_action(rtg[:L], s[:L], a[:L], ts[:L])
        assert act.shape == (2,)
        lo = max(0, L - DT_CFG.context)  # get_action keeps the last `context` steps
        ref = model(rtg[None, lo:L], s[None, lo:L], a[None, lo:L], ts[None, lo:L])[0, -1]
        torch.testing.assert_close(act, ref)
        # the 1-D return form and the placeholder last action do not matter
        a2 = a[:L].clone()
        a2[-1] = 5.0
        torch.testing.assert_close(model.get_action(rtg[:L, 0], s[:L], a2, ts[:L]), act)


def test_dt_errors(gen):
    model = DecisionTransformer(DT_CFG)
    rtg, s, a, ts = _dt_inputs(2, 4, DT_CFG, gen)
    with pytest.raises(ValueError, match="state_dim=3"):
        model(rtg, s[..., :2], a, ts)
    with pytest.raises(ValueError, match="actions"):
        model(rtg, s, a[:, :3], ts)
    with pytest.raises(ValueError, match="returns_to_go"):
        model(rtg[..., 0], s, a, ts)
    with pytest.raises(ValueError, match="torch.long"):
        model(rtg, s, a, ts.double())
    with pytest.raises(ValueError, match="max_ep_len=50"):
        model(rtg, s, a, ts + 50)
    with pytest.raises(ValueError, match="attention_mask"):
        model(rtg, s, a, ts, attention_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="unbatched"):
        model.get_action(rtg, s, a, ts)


# ---------------------------------------------------------------------------------------------
# pretrain


def test_pretrain_student_learns_teacher(gen):
    teacher = Transformer(TransformerConfig(d_in=2, d_out=1, d_model=8, max_len=6)).requires_grad_(False)
    x = torch.randn(256, 6, 2, generator=gen)
    y = teacher(x)
    student = Transformer(TransformerConfig(d_in=2, d_out=1, d_model=8, max_len=6))
    losses = pretrain(student, (x, y), steps=300, lr=3e-3, batch_size=64)
    assert len(losses) == 300 and not student.training
    assert sum(losses[-20:]) / 20 < 0.2 * sum(losses[:5]) / 5
    with torch.no_grad():  # better than the best constant predictor by far, not just a fitted mean
        assert ((student(x) - y) ** 2).mean() < 0.1 * y.var()
    # reproducible given the initial weights and the seed
    student2 = Transformer(TransformerConfig(d_in=2, d_out=1, d_model=8, max_len=6))
    student2.load_state_dict(student.state_dict())
    s3 = Transformer(TransformerConfig(d_in=2, d_out=1, d_model=8, max_len=6))
    s3.load_state_dict(student2.state_dict())
    assert pretrain(student2, (x, y), steps=3) == pretrain(s3, (x, y), steps=3)


def test_pretrain_dt_tensors_and_loss_fn(gen):
    cfg = DTConfig(state_dim=2, act_dim=1, d_model=8, max_ep_len=20, context=3)
    rtg, s, a, ts = _dt_inputs(128, 3, cfg, gen)
    target = torch.tanh(s[..., :1] - 0.5 * s[..., 1:])  # (N, K, 1): action is a function of the state
    model = DecisionTransformer(cfg)
    losses = pretrain(model, ((rtg, s, a, ts), target), steps=150, lr=3e-3, batch_size=32)
    assert sum(losses[-10:]) / 10 < 0.3 * sum(losses[:5]) / 5
    with torch.no_grad():
        assert ((model(rtg, s, a, ts) - target) ** 2).mean() < 0.2 * target.var()

    def loss_fn(m: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        return ((m(rtg[idx], s[idx], a[idx], ts[idx]) - target[idx]) ** 2).mean()

    losses2 = pretrain(model, loss_fn, steps=5, n_data=128, batch_size=500)  # batch capped at n_data
    assert len(losses2) == 5
    with pytest.raises(ValueError, match="n_data"):
        pretrain(model, loss_fn, steps=1)
    with pytest.raises(ValueError, match="rows"):
        pretrain(model, ((rtg[:5], s, a, ts), target), steps=1)
