"""LRP through attention: AttnLRP's rules by hand, CP-LRP's conservation, ViT, Swin and a user's own ViT.

What conserves (Σ input relevance = Σ seeded relevance) and what does not:

- CP-LRP (attention weights constant) conserves through every step, up to the ε stabilisers, once every bias
  is zero: linear and LayerNorm biases, the in-projection bias, position embeddings, the class token and
  Swin's padding (zero tokens get nothing). The relative-position bias and shift mask only move attention
  weights, which CP-LRP treats as constants, so they need not be zero. Measured here: ≤ 9e-5 of the seed
  (ViT, Swin-T), ≤ 2.8e-4 (Swin-V2-T, the user's ViT), one class and label-free; tolerance 1e-3.
- AttnLRP's bilinear rule (``A V``, ``Q Kᵀ``, any ``a @ b``) conserves up to ε; its softmax rule does not
  (Prop. 3.1: the softmax's bias absorbs ``Σ R − Σ x (R − s Σ R)``, see the hand-set block below), so an
  AttnLRP explanation of a transformer sums to something else than its seed.
"""

from __future__ import annotations

import math
import operator
import time

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from handlers.explain.lrp import LRP, Epsilon, Gamma, MatMul, Op, Softmax, Unsupported, attention_rules
from handlers.explain.lrp.attention import softmax_relevance

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- small models ------------------------------------------------------------------------------------------------


def small_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.2)  # torchvision initialises the head to zero
        model.class_token.normal_(0, 0.5)
    return model.eval()


def small_swin(name: str = "swin_t", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return getattr(torchvision.models, name)(num_classes=10).eval()


class HandAttention(nn.Module):
    """Self-attention written out: one Linear for q, k, v, ``softmax(q kᵀ / √d) v``, an output Linear."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = (q * (dim // self.heads) ** -0.5 @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(n, length, dim))


class HandBlock(nn.Module):
    """A pre-norm block with :class:`HandAttention` and a GELU MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = HandAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UserViT(nn.Module):
    """A user's own ViT: patch-embedding conv, class token, position embedding, one ``nn.TransformerEncoderLayer``,
    one hand-written block, a final LayerNorm and a head on the class token."""

    def __init__(self, dim: int = 16, patch: int = 8, side: int = 32, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, 1 + (side // patch) ** 2, dim) * 0.1)
        self.blocks = nn.ModuleList(
            [
                nn.TransformerEncoderLayer(
                    dim, 2, 2 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
                ),
                HandBlock(dim, 2),
            ]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def user_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return UserViT().eval()


def without_biases(model: nn.Module) -> nn.Module:
    """Every bias, LayerNorm shift, in-projection bias, position embedding and class token set to zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("bias", "in_proj_bias", "class_token", "pos_embedding", "cls", "pos"):
                p.zero_()
    return model


MODELS = {
    # name: (builder, input side, the layer label-free LRP is seeded at: the last encoder block)
    "vit": (small_vit, 32, "encoder.layers.encoder_layer_1"),
    "swin_t": (small_swin, 64, "features.7"),
    "swin_v2_t": (lambda: small_swin("swin_v2_t"), 64, "features.7"),
    "user": (user_vit, 32, "blocks.1"),
}


def images(n: int, side: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def conserved(result, tolerance: float) -> None:
    total = result.maps.flatten(1).sum(1)
    torch.testing.assert_close(total, result.seed, rtol=tolerance, atol=tolerance * float(result.seed.abs().max()))


# --- the rules by hand ---------------------------------------------------------------------------------------------


def test_softmax_rule_by_hand():
    """x = (0, ln 3): s = (1/4, 3/4). R = (1, 1), Σ R = 2: R_x = x ⊙ (R − 2s) = (0, ln 3 · (1 − 3/2)).
    With a −∞ logit first (masked: its weight is 0 and so is its relevance R), s = (0, 1/4, 3/4) and that logit
    gets 0, not −∞ · 0 = nan (it is taken as 0); the rest as before."""
    x = torch.tensor([[0.0, math.log(3.0)]])
    got = softmax_relevance(x, x.softmax(-1), torch.ones(1, 2))
    torch.testing.assert_close(got, torch.tensor([[0.0, -0.5 * math.log(3.0)]]), rtol=1e-6, atol=1e-7)
    x = torch.tensor([[float("-inf"), 0.0, math.log(3.0)]])
    got = softmax_relevance(x, x.softmax(-1), torch.tensor([[0.0, 1.0, 1.0]]))
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.0, -0.5 * math.log(3.0)]]), rtol=1e-6, atol=1e-7)


def graph_op(rule, target, inputs: int) -> Op:
    op = Op("node", "call_function", target, "test", None, target, inputs, lambda args, kwargs: list(args[:inputs]))
    op.nonnegative, op.constant = (False,) * inputs, (False,) * inputs
    rule.setup(op)
    return op


def test_matmul_rule_splits_each_product_in_half_and_conserves():
    """O = A B with A = [[1, 2]], B = [[3], [1]]: O = 3·1 + 1·2 = 5, R_O = 5. Each product a_k b_k gets its share
    a_k b_k / O · R, half to each factor: R_A = R_B = (3/2, 1) (transposed for B). Σ R_A + Σ R_B = 5."""
    rule = MatMul(1e-9)
    a, b = torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[3.0], [1.0]]])
    op = graph_op(rule, torch.matmul, 2)
    out, saved = rule.forward(op, (a, b), {})
    r_a, r_b = rule.relevance(op, out.clone(), saved)
    torch.testing.assert_close(r_a, torch.tensor([[[1.5, 1.0]]]))
    torch.testing.assert_close(r_b, torch.tensor([[[1.5], [1.0]]]))
    # Random factors: conservative to float32 rounding (the ε-stabiliser is 1e-9 here).
    a, b = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 4, 6)
    out, saved = rule.forward(op, (a, b), {})
    r = torch.randn_like(out)
    r_a, r_b = rule.relevance(op, r.clone(), saved)
    torch.testing.assert_close(r_a.sum() + r_b.sum(), r.sum(), rtol=1e-4, atol=1e-4)
    # A constant factor (CP-LRP's attention weights) leaves everything to the other: LRP-ε, conservative.
    op.constant = (True, False)
    r_a, r_b = rule.relevance(op, r.clone(), saved)
    assert r_a is None
    torch.testing.assert_close(r_b.sum(), r.sum(), rtol=1e-4, atol=1e-4)


LN3 = math.log(3.0)


def hand_attention_weights() -> dict[str, torch.Tensor]:
    """Tokens t1 = (1, 0), t2 = (0, 1) (the input is the identity); one head, d = 2, no biases.

    W_q = √2 [[ln 3, 0], [0, 0]] so that q/√2 = [[ln 3, 0], [0, 0]]; W_k = I (k = I); W_v = diag(2, 4); W_o = I.
    Logits L = q kᵀ/√2 = [[ln 3, 0], [0, 0]] → A = [[3/4, 1/4], [1/2, 1/2]]; O = A v = [[1.5, 1], [1, 2]].
    """
    return {
        "q": math.sqrt(2.0) * torch.tensor([[LN3, 0.0], [0.0, 0.0]]),
        "k": torch.eye(2),
        "v": torch.diag(torch.tensor([2.0, 4.0])),
        "o": torch.eye(2),
    }


class TwoTokens(nn.Module):
    """``(1, 1, 2, 2)`` image → two tokens of dim 2 (its rows) → attention → Σ of the outputs (a Linear of ones)."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attention = attention
        self.head = nn.Linear(4, 1, bias=False)
        with torch.no_grad():
            self.head.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.view(x.shape[0], 2, 2)
        out = (
            self.attention(t, t, t, need_weights=False)[0]
            if isinstance(self.attention, nn.MultiheadAttention)
            else (self.attention(t))
        )
        return self.head(out.flatten(1))


def two_token_models() -> dict[str, nn.Module]:
    w = hand_attention_weights()
    mha = nn.MultiheadAttention(2, 1, bias=False, batch_first=True)
    hand = HandAttention(2, 1)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([w["q"], w["k"], w["v"]]))
        mha.out_proj.weight.copy_(w["o"])
        hand.qkv.weight.copy_(torch.cat([w["q"], w["k"], w["v"]]))
        hand.qkv.bias.zero_()
        hand.proj.weight.copy_(w["o"])
        hand.proj.bias.zero_()
    return {"module": TwoTokens(mha).eval(), "graph": TwoTokens(hand).eval()}


@pytest.mark.parametrize("form", ["module", "graph"])
def test_attention_by_hand_attnlrp(form):
    """AttnLRP on the hand-set block (weights in :func:`hand_attention_weights`), logit 5.5 = Σ O.

    Head and out-projection (ε, no bias): R_O = O. ``A V``, uniform rule: s = R_O / (2 O) = 1/2 everywhere, so
      R_v[k] = v_k · (Σ_i A_ik)/2 = (2 · 5/8, 0), (0, 4 · 3/8) = (1.25, 0), (0, 1.5)                  Σ = 2.75
      R_A[i, k] = A_ik · (Σ_j v_kj)/2 = A ⊙ [[1, 2], [1, 2]] = [[3/4, 1/2], [1/2, 1]]                   Σ = 2.75
    Softmax (Prop. 3.1), row 1: Σ R_A = 5/4, R_A − A·5/4 = (−3/16, 3/16), times L = (ln 3, 0): (−3/16 ln 3, 0);
      row 2: L = 0, so 0. The softmax passes on −3/16 ln 3 ≈ −0.206 of its 2.75: not conservative.
    ``Q Kᵀ``, uniform: with G = R_A − A ΣR_A = [[−3/16, 3/16], [−1/4, 1/4]] and k = I,
      R_q = q ⊙ (G/2 · k) = [[−3/32 ln 3, 0], [0, 0]],  R_k = k ⊙ (G/2)ᵀ q = [[−3/32 ln 3, 0], [0, 0]].
    In-projection (ε, no bias, x = I): every token's q, k and v relevance goes back to its own row, so
      R_x = [[1.25 − 3/16 ln 3, 0], [0, 1.5]].
    """
    model = two_token_models()[form]
    result = LRP(model).relevance(torch.eye(2).view(1, 1, 2, 2), classes=torch.tensor([0]))
    expected = torch.tensor([[1.25 - 3 / 16 * LN3, 0.0], [0.0, 1.5]])
    torch.testing.assert_close(result.maps[0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.seed, torch.tensor([5.5]))


@pytest.mark.parametrize("form", ["module", "graph"])
def test_attention_by_hand_cp_lrp(form):
    """CP-LRP on the same block: A is a constant, so ``A V`` is LRP-ε with all of R_O = O for the values:
    R_v[k] = v_k · Σ_i A_ik R_O,ij / O_ij = (2 · 5/4, 0), (0, 4 · 3/4) = (2.5, 0), (0, 3): Σ = 5.5, conserved."""
    model = two_token_models()[form]
    result = LRP(model, rules=attention_rules(cp=True)).relevance(
        torch.eye(2).view(1, 1, 2, 2), classes=torch.tensor([0])
    )
    torch.testing.assert_close(result.maps[0], torch.tensor([[2.5, 0.0], [0.0, 3.0]]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cp", [False, True])
def test_module_rule_equals_the_written_out_graph(cp):
    """``nn.MultiheadAttention`` under its rule gives what the same attention written out with Linear, softmax
    and ``@`` gives under the graph rules (random weights and biases, 2 heads)."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    hand = HandAttention(8, 2)
    with torch.no_grad():
        mha.in_proj_bias.normal_(0, 0.3)
        mha.out_proj.bias.normal_(0, 0.3)
        hand.qkv.weight.copy_(mha.in_proj_weight)
        hand.qkv.bias.copy_(mha.in_proj_bias)
        hand.proj.load_state_dict(mha.out_proj.state_dict())

    class Tokens(nn.Module):
        def __init__(self, attention: nn.Module) -> None:
            super().__init__()
            self.attention = attention
            self.head = nn.Linear(8 * 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = x.flatten(2).transpose(1, 2)  # (N, 4 tokens, 8)
            out = self.attention(t, t, t)[0] if isinstance(self.attention, nn.MultiheadAttention) else self.attention(t)
            return self.head(out.flatten(1))

    module, graph = Tokens(mha).eval(), Tokens(hand).eval()
    with torch.no_grad():
        graph.head.load_state_dict(module.head.state_dict())
    rules = attention_rules(cp=cp)
    x = torch.randn(2, 8, 2, 2, generator=torch.Generator().manual_seed(3))
    classes = torch.tensor([[0, 2], [1, 0]])
    got = LRP(module, rules=rules).relevance(x, classes=classes).maps
    expected = LRP(graph, rules=rules).relevance(x, classes=classes).maps
    # The graph rules run Q Kᵀ under ε (1e-6) where the module's rule runs it without: float32 rounding only.
    torch.testing.assert_close(got, expected, rtol=0.0, atol=1e-4 * float(expected.abs().max()))


def test_softmax_rule_is_an_input_times_its_own_jacobian():
    """Prop. 3.1 equals x ⊙ Jᵀ(R / s), the softmax's exact gradient applied to R / s (LXT's observation)."""
    torch.manual_seed(0)
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    s = x.softmax(-1)
    r = torch.randn(3, 7, dtype=torch.float64)
    (grad,) = torch.autograd.grad(s, x, r / s.detach())
    op = graph_op(Softmax(), torch.softmax, 1)
    _, saved = Softmax().forward(op, (x.detach(), -1), {})
    torch.testing.assert_close(Softmax().relevance(op, r, saved)[0], x.detach() * grad)


# --- models: conservation, K classes, the user's model untouched ------------------------------------------------


def zero_biased(name: str) -> tuple[nn.Module, int, str]:
    """The model without biases, LayerNorm weights drawn in [0.5, 1.5]: with weights 1 and no shift every
    normalised token sums to 0, and so would a label-free seed after a (post-)norm (Swin v2's blocks)."""
    build, side, layer = MODELS[name]
    model = without_biases(build())
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
    return model, side, layer


@pytest.mark.parametrize("name", list(MODELS))
def test_cp_lrp_conserves_without_biases(name):
    """CP-LRP, every bias zero: the maps sum to the seed (one class, and label-free at the last block) to 1e-3."""
    model, side, layer = zero_biased(name)
    lrp = LRP(model, rules=attention_rules(cp=True))
    x = images(2, side)
    for result in (lrp.relevance(x, classes=torch.tensor([3, 7]) % 5), lrp.relevance(x, layer=layer)):
        assert bool(result.maps.isfinite().all())
        assert float(result.maps.abs().max()) > 0
        conserved(result, 1e-3)


def test_attnlrp_does_not_conserve_through_the_softmax():
    """AttnLRP on the same bias-free ViT: the softmax rule's bias takes its share, so the sum moves away from the
    seed (measured on these random weights: 60 % for one class, 3.3x the seed label-free; Swin-T 32 % and 4 %,
    the user's ViT 1.7x and 4.5x), while CP-LRP on the same model conserves (the test above)."""
    model, side, _ = zero_biased("vit")
    result = LRP(model).relevance(images(2, side), classes=torch.tensor([3, 7]))
    gap = (result.maps.flatten(1).sum(1) - result.seed).abs() / result.seed.abs()
    assert float(gap.max()) > 1e-2


def _half(y: torch.Tensor) -> torch.Tensor:
    """``y`` with half its gradient: both factors of a product then get half (the uniform rule as a gradient)."""
    return 0.5 * y + 0.5 * y.detach()


def _norm(module: nn.LayerNorm, t: torch.Tensor) -> torch.Tensor:
    sigma = (t.var(-1, keepdim=True, unbiased=False) + module.eps).sqrt().detach()
    return (t - t.mean(-1, keepdim=True)) / sigma * module.weight + module.bias


def modified_gradient_vit(model: nn.Module, x: torch.Tensor, classes: torch.Tensor, *, cp: bool) -> torch.Tensor:
    """AttnLRP / CP-LRP for torchvision's ViT as input × a modified gradient (LXT's "efficient" formulation,
    Arras et al. 2025, arXiv:2502.15886, written here independently): LayerNorm's σ detached, GELU's Jacobian
    replaced by f(x)/x, both factors of Q Kᵀ and A V given half the gradient (CP-LRP: A detached), the softmax
    and everything else left to autograd. Without biases, LRP-ε with ε → 0 is exactly this."""
    x = x.clone().requires_grad_(True)
    n = x.shape[0]
    patch = model.conv_proj
    t = F.conv2d(x, patch.weight, patch.bias, stride=patch.stride).flatten(2).transpose(1, 2)
    t = torch.cat([model.class_token.expand(n, -1, -1), t], 1) + model.encoder.pos_embedding
    for block in model.encoder.layers:
        attention, h = block.self_attention, _norm(block.ln_1, t)
        e, heads = h.shape[-1], block.self_attention.num_heads
        qkv = F.linear(h, attention.in_proj_weight, attention.in_proj_bias)
        q, k, v = (z.view(n, -1, heads, e // heads).transpose(1, 2) for z in qkv.chunk(3, -1))
        a = _half(q * (e // heads) ** -0.5 @ k.transpose(-2, -1)).softmax(-1)
        o = a.detach() @ v if cp else _half(a @ v)
        t = t + attention.out_proj(o.transpose(1, 2).reshape(n, -1, e))
        z = block.mlp[0](_norm(block.ln_2, t))
        t = t + block.mlp[3](z * (F.gelu(z) / z).detach())
    logits = model.heads(_norm(model.encoder.ln, t)[:, 0])
    torch.testing.assert_close(logits, model(x.detach()))
    (grad,) = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), x)
    return (x * grad).sum(1).detach()


@pytest.mark.parametrize("cp", [False, True])
def test_explicit_rules_equal_the_modified_gradient_formulation(cp):
    """The explicit relevance pass equals input × modified gradient on a bias-free ViT, in float64 with ε = 1e-12
    everywhere (the patch embedding under ε too): measured 9e-10 of the largest value; tolerance 1e-7."""
    model, side, _ = zero_biased("vit")
    model = model.double()
    x, classes = images(2, side).double(), torch.tensor([3, 2])
    expected = modified_gradient_vit(model, x, classes, cp=cp)
    tiny = 1e-12
    rules = attention_rules(cp=cp, epsilon=tiny, stabilizer=tiny)
    lrp = LRP(model, first_rule=Epsilon(tiny), epsilon=tiny, stabilizer=tiny, rules=rules)
    got = lrp.relevance(x, classes=classes).maps
    torch.testing.assert_close(got, expected, rtol=0.0, atol=1e-7 * float(expected.abs().max()))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("cp", [False, True])
def test_runs_label_free_and_per_class(name, cp):
    build, side, layer = MODELS[name]
    model = build()
    lrp = LRP(model, rules=attention_rules(cp=cp) if cp else None)
    assert layer in lrp.layers
    x = images(2, side)
    for result in (lrp.relevance(x, classes=torch.tensor([1, 4])), lrp.relevance(x, layer=layer)):
        assert result.maps.shape == (2, side, side)
        assert bool(result.maps.isfinite().all())
        assert float(result.maps.abs().max()) > 0


@pytest.mark.parametrize("name", list(MODELS))
def test_classes_in_one_tiled_pass_equal_one_class_per_pass(name):
    build, side, _ = MODELS[name]
    model = build()
    x = images(2, side, seed=4)
    classes = torch.tensor([[0, 3, 1], [4, 2, 0]])
    for rules in (None, attention_rules(cp=True)):
        one = LRP(model, chunk_size=1, rules=rules).relevance(x, classes=classes)
        tiled = LRP(model, chunk_size=3, rules=rules).relevance(x, classes=classes)
        torch.testing.assert_close(tiled.maps, one.maps, rtol=0.0, atol=1e-5 * float(one.maps.abs().max()))


@pytest.mark.parametrize("name", ["vit", "swin_t", "user"])
def test_the_users_model_is_left_bit_identical(name):
    build, side, layer = MODELS[name]
    model = build()
    x = images(2, side)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attributes = {n: set(vars(m)) for n, m in model.named_modules()}
    modes = [m.training for m in model.modules()]
    with torch.no_grad():
        before = model(x)
    lrp = LRP(model)
    lrp.label_free(x, layer)
    lrp.for_classes(x, torch.tensor([1, 2]))
    LRP(model, rules=attention_rules(cp=True, linear=Gamma(0.25))).for_classes(x, torch.tensor([1, 2]))
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert attributes == {n: set(vars(m)) for n, m in model.named_modules()}
    assert modes == [m.training for m in model.modules()]
    for m in model.modules():
        assert not any((m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks))
    assert all(p.grad is None for p in model.parameters())


# --- seeding at token layers ---------------------------------------------------------------------------------------


def block_output(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    found = []
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, out: found.append(out))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return found[0]


@pytest.mark.parametrize("name", ["vit", "user", "swin_t"])
def test_label_free_seeds_only_the_patch_tokens(name):
    """A ViT block's output (N, 1 + h·w, C): the class token is not seeded; Swin's (N, h, w, C) is seeded whole."""
    build, side, layer = MODELS[name]
    model = build()
    x = images(2, side)
    out = block_output(model, layer, x)
    patches = out[:, 1:] if out.dim() == 3 else out
    result = LRP(model).relevance(x, layer=layer)
    torch.testing.assert_close(result.seed, patches.flatten(1).sum(1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("name", "layer"), [("vit", "encoder.layers.encoder_layer_0"), ("swin_t", "features.7")])
def test_masks_at_token_layers_use_the_patch_grid(name, layer):
    """A mask of ones over the (h, w) patch grid at a block keeps the patch tokens' relevance; zeros keep none.

    The class and register tokens are dropped, as label-free LRP does not seed them. At a ViT's LAST block a
    class's relevance sits on the class token alone (the head reads only it), so a mask there keeps nothing:
    the test masks the block before it.
    """
    build, side, _ = MODELS[name]
    model = build()
    lrp = LRP(model)
    x = images(2, side)
    grid = (4, 4) if name == "vit" else (2, 2)
    ones = lrp.relevance(x, classes=torch.tensor([1, 2]), mask=(layer, torch.ones(2, *grid)))
    assert ones.maps.shape == (2, side, side)
    assert float(ones.maps.abs().max()) > 0
    zeros = lrp.relevance(x, classes=torch.tensor([1, 2]), mask=(layer, torch.zeros(2, *grid)))
    assert float(zeros.maps.abs().max()) == 0.0
    with pytest.raises(ValueError, match=rf"mask for layer '{layer}' must have shape \(2, {grid[0]}, {grid[1]}\)"):
        lrp.relevance(x, classes=torch.tensor([1, 2]), mask=(layer, torch.ones(2, 3, 3)))


# --- what is refused ----------------------------------------------------------------------------------------------


class Tokens(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(8 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.flatten(2).transpose(1, 2)
        out = self.body(t, t, t)[0] if isinstance(self.body, nn.MultiheadAttention) else self.body(t, t)
        return self.head(out.flatten(1))


class EinsumAttention(nn.Module):
    def forward(self, x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nld,nmd->nlm", x, x).softmax(-1) @ x


def test_unsupported_attention_is_refused_naming_the_module_and_its_type():
    with pytest.raises(
        Unsupported, match=r"module 'body' \(MultiheadAttention\): nn.MultiheadAttention with add_bias_kv"
    ):
        LRP(Tokens(nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)))
    with pytest.raises(Unsupported, match=r"module 'body' of type TransformerDecoderLayer has no LRP rule"):
        LRP(Tokens(nn.TransformerDecoderLayer(8, 2, 16, batch_first=True)))
    with pytest.raises(Unsupported, match=r"function torch.functional.einsum in module 'body' \(EinsumAttention\)"):
        LRP(Tokens(EinsumAttention()))


# --- real size ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["vit_b_16", "vit_b_32"])
def test_real_size_vit_at_224(arch):
    """torchvision's ViT-B at 224 px (random weights): label-free at the last block and per class, < 30 s."""
    start = time.perf_counter()
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().eval()
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.02)
    lrp = LRP(model)
    x = images(1, 224)
    for result in (
        lrp.relevance(x, classes=torch.tensor([3])),
        lrp.relevance(x, layer="encoder.layers.encoder_layer_11"),
    ):
        assert result.maps.shape == (1, 224, 224)
        assert bool(result.maps.isfinite().all())
        assert float(result.maps.abs().max()) > 0
    assert time.perf_counter() - start < 30


def test_vit_operations_get_the_attnlrp_rules():
    """GELU passes relevance unchanged, LayerNorm runs with σ constant, attention under its module rule, the
    class-token ``cat`` is routed and ``+ pos_embedding`` is a sum with a constant (the bias absorbs its share)."""
    lrp = LRP(small_vit())
    rules: dict[str, set[str]] = {}
    for step in lrp._graph.steps:
        if step.op is not None:
            what = type(step.op.module).__name__ if step.op.module is not None else str(step.op.target)
            rules.setdefault(what, set()).add(type(step.rule).__name__)
    assert rules["GELU"] == {"Pass"}
    assert rules["LayerNorm"] == {"LayerNormRule"}
    assert rules["MultiheadAttention"] == {"Attention"}
    assert rules["Linear"] == {"Epsilon"}
    assert "Route" in rules[str(torch.cat)]
    assert "Norm" in rules[str(operator.add)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["vit", "swin_t", "user"])
def test_same_maps_on_the_gpu(name):
    """On cuda:0 (8 classes per pass by default) the maps are the CPU's, to float32 reordering."""
    build, side, layer = MODELS[name]
    model = build()
    x = images(2, side, seed=5)
    classes = torch.tensor([[0, 3, 1], [4, 2, 0]])
    cpu = LRP(model).relevance(x, classes=classes).maps
    cpu_free = LRP(model).label_free(x, layer)
    lrp = LRP(model.to("cuda:0"))
    gpu = lrp.relevance(x.to("cuda:0"), classes=classes.to("cuda:0")).maps
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0.0, atol=1e-4 * float(cpu.abs().max()))
    gpu_free = lrp.label_free(x.to("cuda:0"), layer).cpu()
    torch.testing.assert_close(gpu_free, cpu_free, rtol=0.0, atol=1e-4 * float(cpu_free.abs().max()))
