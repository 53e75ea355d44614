"""MAE pieces against the paper's formulation, written out independently here."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch

from vittune.deploy.timm_folder import export_config, write_export
from vittune.errors import RecipeError
from vittune.models.backbone import create_backbone
from vittune.models.mae import (
    MaskedAutoencoder,
    build_decoder,
    check_encoder,
    freeze_sincos_pos_embed,
    patchify,
    random_masking,
    unpatchify,
)
from vittune.optim.param_groups import build_param_groups
from vittune.recipe.schema import MaeConfig, ModelConfig, Recipe
from vittune.tasks.mae import MaeTask

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=0)
SMALL_DECODER = MaeConfig(decoder_depth=2, decoder_dim=32, decoder_heads=2)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and thrash when CI shares its cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_encoder(
    name: str = "vit_tiny_patch16_224", in_chans: int = 1, **kwargs
) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, in_chans=in_chans, **{**TINY, **kwargs})


def tiny_mae(encoder=None, mask_ratio: float = 0.75, norm_pix: bool = True) -> MaskedAutoencoder:
    encoder = encoder if encoder is not None else tiny_encoder()
    freeze_sincos_pos_embed(encoder)
    return MaskedAutoencoder(encoder, build_decoder(encoder, SMALL_DECODER), mask_ratio, norm_pix)


def patch_pixels(image: torch.Tensor, index: int, p: int, cols: int) -> torch.Tensor:
    """One patch of a [C, H, W] image, flattened (row, col, channel), by plain slicing."""
    r, c = divmod(index, cols)
    return image[:, r * p : (r + 1) * p, c * p : (c + 1) * p].permute(1, 2, 0).reshape(-1)


def prefix_tokens(encoder) -> list[torch.Tensor]:
    """The encoder's leading tokens in timm's order (class, distillation, registers), each [n, D]."""
    names = ("cls_token", "dist_token", "reg_token")
    return [getattr(encoder, n)[0] for n in names if getattr(encoder, n, None) is not None]


def reference_loss(mae: MaskedAutoencoder, images, noise, norm_pix: bool) -> torch.Tensor:
    """The paper's MAE written token by token: keep the K lowest-noise patches of each image,
    encode them with the prefix tokens, fill the rest with the mask token in the decoder, and
    average the per-patch squared error over the removed patches only."""
    enc, dec = mae.encoder, mae.decoder
    p = mae.patch_size
    rows, cols = enc.patch_embed.grid_size
    n = rows * cols
    k = round(n * (1 - mae.mask_ratio))
    tokens = enc.patch_embed(images)  # [B, N, D]
    prefix = torch.cat([tokens.new_zeros(0, tokens.shape[-1]), *prefix_tokens(enc)])  # [P, D]
    n_prefix = prefix.shape[0]
    pos = enc.pos_embed[0]
    prefix_pos = torch.zeros_like(prefix) if enc.no_embed_class else pos[:n_prefix]
    patch_pos = pos if enc.no_embed_class else pos[n_prefix:]
    errors = []
    for b in range(images.shape[0]):
        keep = sorted(sorted(range(n), key=lambda i: noise[b, i].item())[:k])  # by patch index
        seq = [prefix + prefix_pos] + [(tokens[b, i] + patch_pos[i])[None] for i in keep]
        latent = enc.norm(enc.blocks(torch.cat(seq)[None]))[0]  # [P + K, D]
        embedded = dec.embed(latent)
        slots = [embedded[:n_prefix]]
        for i in range(n):
            slots.append(
                embedded[n_prefix + keep.index(i)][None] if i in keep else dec.mask_token[0]
            )
        z = torch.cat(slots)[None] + dec.pos_embed
        pred = dec.pred(dec.norm(dec.blocks(z)))[0, n_prefix:]  # [N, p*p*C]
        for i in range(n):
            if i in keep:
                continue
            target = patch_pixels(images[b], i, p, cols)
            if norm_pix:
                target = (target - target.mean()) / math.sqrt(target.var().item() + 1e-6)
            errors.append(((pred[i] - target) ** 2).mean())
    return torch.stack(errors).mean()


def test_patchify_matches_slicing_and_inverts():
    images = torch.randn(2, 3, 16, 24)
    patches = patchify(images, 8)  # [2, 6, 192]
    assert patches.shape == (2, 6, 8 * 8 * 3)
    for b in range(2):
        for i in range(6):
            torch.testing.assert_close(patches[b, i], patch_pixels(images[b], i, 8, 3))
    torch.testing.assert_close(unpatchify(patches, 8, (2, 3), 3), images)


@pytest.mark.parametrize("n, ratio", [(16, 0.75), (64, 0.75), (49, 0.6), (16, 0.5), (196, 0.9)])
def test_each_sample_keeps_round_n_times_one_minus_ratio(n, ratio):
    masking = random_masking(8, n, ratio)
    keep = round(n * (1 - ratio))
    assert masking.ids_keep.shape == (8, keep)
    assert masking.mask.sum(dim=1).tolist() == [n - keep] * 8
    for b in range(8):  # mask is 0 exactly at the kept ids
        assert set(masking.mask[b].eq(0).nonzero().flatten().tolist()) == set(
            masking.ids_keep[b].tolist()
        )
    assert len({tuple(m.tolist()) for m in masking.mask}) > 1  # per-sample, not one shared mask


def test_masking_keeps_the_lowest_noise():
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.7, 0.1]])
    masking = random_masking(2, 4, 0.5, noise=noise)
    assert masking.mask.tolist() == [[1, 0, 1, 0], [0, 1, 1, 0]]


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("vit_tiny_patch16_224", {}),
        ("vit_tiny_patch16_224", {"reg_tokens": 2, "no_embed_class": True}),
        ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}),
        ("deit_tiny_distilled_patch16_224", {}),
    ],
)
def test_loss_equals_the_paper_formulation(name, kwargs, norm_pix):
    mae = tiny_mae(tiny_encoder(name, in_chans=3, **kwargs), norm_pix=norm_pix).eval()
    images = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 16)
    with torch.no_grad():
        ours = mae(images, noise=noise).loss
        reference = reference_loss(mae, images, noise, norm_pix)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_encoder_sees_only_visible_tokens_and_never_masked_pixels():
    mae = tiny_mae().eval()
    seen = []
    mae.encoder.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    images, noise = torch.randn(4, 1, 32, 32), torch.rand(4, 16)
    with torch.no_grad():
        first = mae(images, noise=noise)
    assert seen == [torch.Size([4, 1 + 4, 64])]  # class token + round(16 x 0.25) patches
    # Scribble over every masked patch: predictions cannot change, the loss (its target) must.
    mask = first.masking.mask.unsqueeze(-1)  # [B, N, 1]
    scribbled = unpatchify(patchify(images, 8) + 5.0 * mask * torch.randn(4, 16, 64), 8, (4, 4), 1)
    with torch.no_grad():
        second = mae(scribbled, noise=noise)
    torch.testing.assert_close(second.pred, first.pred)
    assert not torch.isclose(second.loss, first.loss)


@pytest.mark.parametrize(
    "kwargs", [{}, {"class_token": False, "global_pool": "avg", "reg_tokens": 1}]
)
def test_every_trainable_parameter_gets_a_gradient(kwargs):
    """What MAE does not use (an avg-pool model's fc_norm) is frozen: DDP needs no unused ones."""
    encoder = tiny_encoder(**kwargs)
    task = MaeTask(Recipe(mae=SMALL_DECODER), encoder)
    task(torch.randn(2, 1, 32, 32)).loss.backward()
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in task.named_parameters() if p.grad is not None}
    assert trainable == with_grad
    assert ("model.fc_norm.weight" in dict(task.named_parameters())) is bool(kwargs)


def test_sincos_pos_embed_is_the_papers_and_frozen():
    encoder = tiny_encoder()
    freeze_sincos_pos_embed(encoder)
    d = 64 // 4
    omega = 1.0 / 10000 ** (torch.arange(d, dtype=torch.float64) / d)
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    h, w = rows.reshape(-1, 1) * omega, cols.reshape(-1, 1) * omega  # [N, D/4]
    expected = torch.cat([h.sin(), w.sin(), h.cos(), w.cos()], dim=1).float()
    torch.testing.assert_close(encoder.pos_embed[0, 1:], expected)
    assert encoder.pos_embed[0, 0].abs().sum() == 0  # the class token's row, as in the paper
    assert not encoder.pos_embed.requires_grad


def test_param_groups_skip_frozen_positions_and_spare_tokens_from_decay():
    for pos, trainable in (("sincos", False), ("learned", True)):
        recipe = Recipe(
            mae=MaeConfig(pos_embed=pos, decoder_depth=1, decoder_dim=32, decoder_heads=2)
        )
        task = MaeTask(recipe, tiny_encoder())
        groups = build_param_groups(task.optimised_module(), recipe.optim, 1e-3)
        names = {g["name"]: set(g["param_names"]) for g in groups}
        assert {"encoder.cls_token", "decoder.mask_token"} <= names["no_decay"]
        assert (
            "decoder.embed.weight" in names["decay"]
            and "encoder.blocks.0.attn.qkv.weight" in names["decay"]
        )
        in_groups = "encoder.pos_embed" in names["no_decay"] | names["decay"]
        assert in_groups is trainable
        assert ("decoder.pos_embed" in names["no_decay"]) is trainable


def tilted_planes(n: int, generator: torch.Generator) -> torch.Tensor:
    """Images a + b * x plus noise: any visible patch tells where the masked ones lie."""
    a, b = (torch.rand(2, n, 1, 1, 1, generator=generator) * 2 - 1).unbind(0)
    x = torch.linspace(-1, 1, 32).view(1, 1, 1, 32)
    return a + b * x + 0.05 * torch.randn(n, 1, 32, 32, generator=generator)


def test_mae_learns_to_fill_masked_patches_from_visible_ones():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    held_out = tilted_planes(64, generator)
    mae = tiny_mae(norm_pix=False)
    noise = torch.rand(64, 16, generator=torch.Generator().manual_seed(1))

    def held_out_loss() -> float:
        with torch.no_grad():
            return mae(held_out, noise=noise).loss.item()

    # The best context-free guess: every masked patch predicted as the mean patch at its place.
    target = patchify(held_out, 8)  # [64, 16, 64]
    mask = random_masking(64, 16, 0.75, noise=noise).mask
    blind = (((target.mean(0, keepdim=True) - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    before = held_out_loss()
    optimizer = torch.optim.AdamW([p for p in mae.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(100):
        optimizer.zero_grad()
        mae(tilted_planes(32, generator)).loss.backward()
        optimizer.step()
    after = held_out_loss()
    assert after < 0.3 * blind.item() and after < 0.1 * before, (before, blind.item(), after)


def test_reconstruction_grid_pastes_visible_patches_and_greys_masked_ones():
    recipe = Recipe(mae=SMALL_DECODER)
    task = MaeTask(recipe, tiny_encoder(), mean=(0.2,), std=(0.4,)).eval()
    images = torch.randn(3, 1, 32, 32)
    columns = task.reconstruction_columns(images)
    assert list(columns) == ["original", "masked", "reconstruction", "reconstruction + visible"]
    original = (images * 0.4 + 0.2).clamp(0, 1)
    torch.testing.assert_close(columns["original"], original)
    mask = task(images, task._fixed_generator(0, images.device)).masking.mask  # [B, N]
    visible = patchify(torch.ones_like(images), 8) * (1 - mask).unsqueeze(-1)
    visible = unpatchify(visible, 8, (4, 4), 1).bool()
    torch.testing.assert_close(columns["reconstruction + visible"][visible], original[visible])
    assert torch.all(columns["masked"][~visible] == 0.5)


def test_exported_encoder_loads_into_plain_timm_with_only_the_head_missing(tmp_path: Path):
    kwargs = dict(embed_dim=64, depth=2, num_heads=2)
    encoder = tiny_encoder()
    MaeTask(Recipe(mae=SMALL_DECODER), encoder)
    state = encoder.state_dict()
    assert not any(k.startswith(("decoder", "mask_token")) for k in state)
    plain = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, in_chans=1, num_classes=10, **kwargs
    )
    result = plain.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"]
    assert result.unexpected_keys == []
    torch.testing.assert_close(plain.pos_embed, encoder.pos_embed)
    # Through vittune at a larger resolution: the 4x4 position grid is resampled to 6x6.
    config = export_config(encoder, [], 32, 1, (0.5,), (0.5,), "pretrain-mae")
    path = write_export(state, config, tmp_path, "encoder.safetensors")
    cfg = ModelConfig(
        name="vit_tiny_patch16_224", pretrained=str(tmp_path), img_size=48, patch_size=8, in_chans=1
    )
    model, report = create_backbone(cfg, num_classes=3)
    assert report.source == str(path)
    assert report.reinitialised == ["head.bias", "head.weight"]
    assert any("4x4 -> 6x6" in note for note in report.notes)
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, encoder.blocks[1].mlp.fc2.weight)


def test_user_mistakes_raise_one_line_recipe_errors():
    resnet = timm.create_model("resnet18", num_classes=0)
    with pytest.raises(RecipeError, match="VisionTransformer"):
        check_encoder(resnet)
    with pytest.raises(RecipeError, match="keeps 0 of 16"):
        random_masking(2, 16, 0.99)
    with pytest.raises(RecipeError, match="not divisible by mae.decoder_heads"):
        MaeTask(Recipe(mae=MaeConfig(decoder_dim=30, decoder_heads=4)), tiny_encoder())
    with pytest.raises(RecipeError, match="divisible by 4"):
        MaeTask(Recipe(mae=MaeConfig(decoder_dim=30, decoder_heads=3)), tiny_encoder())
