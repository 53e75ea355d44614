"""Albumentations pipelines built from the recipe's `augment:` section.

Images arrive as float32 in [0, 1] with any number of channels, so presets use only
transforms that work on float images of 1 or 3 channels (no uint8-only ops).

Presets also take the decoded integers (`IntegerFirst.from_raw`): their leading geometric
steps (resize, random resized crop, flip, affine) run on the uint8 / uint16 pixels, and the
conversion to float happens on the cropped, model-sized image, which is cheaper than
converting (and resampling) the whole decoded image in float32 (docs/performance.md).
"""

from __future__ import annotations

import difflib
import os
import random
import warnings
from typing import Any

# albumentations asks pypi.org for a newer version at import (up to a 2 s timeout, more when
# DNS hangs) unless told not to: every run, offline cluster nodes included, paid for it.
# A user who wants the check sets the variable to 0.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402
from timm.layers import to_2tuple  # noqa: E402

from vittune.data.decode import (  # noqa: E402
    intensity_range,
    match_channels,
    scale_intensity,
    scale_to_range,
)
from vittune.errors import RecipeError  # noqa: E402
from vittune.recipe.schema import AugmentConfig  # noqa: E402


class InImageRange(A.Sequential):
    """Apply intensity transforms to the image stretched to [0, 1], then map it back.

    Albumentations scales brightness shifts, noise and gamma to the dtype's full range (1.0 for
    float images), which is right for 8-bit and full-range 16-bit images but not for 12-bit
    data in 16-bit files (values up to 4095 / 65535): a brightness shift of 0.1 of full scale
    is 1.6 times the whole image's range and clips it to a constant. Albumentations has no
    option to work relative to an image's own range, hence this wrapper. Full-range images
    are transformed as before; the result stays inside the image's original [min, max], so a
    dim image stays dim (`data.intensity: dtype` keeps its meaning).
    """

    def __init__(self, transforms: list[A.BasicTransform]) -> None:
        super().__init__(transforms, p=1.0)

    def __call__(self, *args: Any, force_apply: bool = False, **data: Any) -> dict[str, Any]:
        image = data["image"]
        low, high = float(image.min()), float(image.max())
        if high <= low:  # a constant image has no range to work in
            return data
        data["image"] = (image - low) / (high - low)
        data = super().__call__(*args, force_apply=force_apply, **data)
        data["image"] = (data["image"] * (high - low) + low).astype(np.float32)
        return data


# Steps that only move pixels (and interpolate them linearly): they commute with the affine
# intensity scaling, up to one rounding of the integer result, so they may run on integers.
_GEOMETRIC = (A.Resize, A.RandomResizedCrop, A.HorizontalFlip, A.Affine)
# The integer types OpenCV resamples (32-bit and 8-bit signed ones go the float path).
_INTEGER_TYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int16))
# The types a training worker may deliver un-normalised (`IntegerFirst.integers`): those that
# `data.intensity: dtype` scales from 0, so dividing by the dtype's maximum is the whole scaling.
_DELIVERED = (np.dtype(np.uint8), np.dtype(np.uint16))


class IntegerNormalise:
    """Normalise a batch of integer images where it is (on the device): [B, C, H, W] uint8 or
    uint16 -> float32 (x / dtype max - mean) / std, as `x * a + b` per channel.

    The coefficients are those the worker-side path (`IntegerFirst._scale_and_normalise`)
    uses, computed alike in float32, so both give the same numbers. Float batches (evaluation,
    augmentations with float steps) are already normalised and pass through unchanged. A plain
    object, not a module: the task holds it outside its state_dict.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        mean32 = np.asarray(mean, np.float32)
        self._scale = np.reciprocal(np.asarray(std, np.float32))  # as A.Normalize
        self._shift = -(mean32 * self._scale)
        self._coefficients: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def coefficients(
        self, dtype: torch.dtype, channels: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b), each [1, C, 1, 1] float32 on `device`, for images of `dtype`."""
        key = (dtype, channels, device)
        if key not in self._coefficients:
            top = np.float32(torch.iinfo(dtype).max)
            a = np.resize(self._scale / top, channels).astype(np.float32)
            b = np.resize(self._shift, channels).astype(np.float32)
            self._coefficients[key] = tuple(
                torch.from_numpy(v).view(1, channels, 1, 1).to(device) for v in (a, b)
            )
        return self._coefficients[key]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.is_floating_point():
            return images
        a, b = self.coefficients(images.dtype, images.shape[-3], images.device)
        return images.float().mul_(a).add_(b)


def normalise_to_tensor(pixels: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> torch.Tensor:
    """(pixels - mean) * scale per channel, [H, W(, C)] float32 -> contiguous [C, H, W].

    What `A.Normalize(max_pixel_value=1)` + `ToTensorV2` compute, in one pass per channel
    written straight into channel-first order (albumentations' Normalize of a 3-channel
    float image costs about as much as decoding a JPEG).
    """
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    height, width, channels = pixels.shape
    out = np.empty((channels, height, width), np.float32)  # [C, H, W]
    for c in range(channels):
        k = c if len(mean) > 1 else 0
        np.subtract(pixels[:, :, c], mean[k], out=out[c])
        out[c] *= scale[k]
    return torch.from_numpy(out)


class IntegerFirst:
    """A preset split in two: its leading geometric steps, then the rest on float32.

    Called like an albumentations pipeline (`pipeline(image=float_pixels)["image"]`), it runs
    both parts on float images in [0, 1]. `from_raw` takes the decoded integers instead: the
    geometric part runs on them, then they are scaled with the range of the whole image
    (taken before the crop, so `data.intensity: minmax` keeps its meaning) and given the
    model's channels. Both parts share one pair of random generators, so a seed gives the same
    crops either way; integer and float results differ by at most the rounding of the
    resampled integers (one level), which the tests pin.

    `integers` (the data module sets it for training): when nothing follows the geometric part
    and `data.intensity` is `dtype`, `from_raw` returns uint8 / uint16 images as they are,
    [C, H, W] with the model's channels, neither scaled nor normalised; `IntegerNormalise` does
    that on the device, where it is nearly free, instead of in the worker, where it costs a
    float32 copy of every image through shared memory (docs/performance.md).
    """

    def __init__(
        self,
        geometric: list[A.BasicTransform],
        rest: list[A.BasicTransform],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        integers: bool = False,
    ) -> None:
        self.integers = integers
        self.geometric = A.Compose(geometric)
        self.rest = A.Compose(rest)  # float steps; then normalise_to_tensor
        self.mean = np.asarray(mean, np.float32)
        self.scale = np.reciprocal(np.asarray(std, np.float32))  # as A.Normalize
        # Affine fills the borders it uncovers with raw 0, which only means 0.0 after scaling
        # when the range starts at 0; other images take the float path.
        self._fills = any(isinstance(t, A.Affine) for t in geometric)

    def set_random_state(self, numpy_rng: np.random.Generator, python_rng: random.Random) -> None:
        self.geometric.set_random_state(numpy_rng, python_rng)
        self.rest.set_random_state(numpy_rng, python_rng)

    def __call__(self, *, image: np.ndarray, **data: Any) -> dict[str, Any]:
        return self._rest(self.geometric(image=image)["image"])

    def _rest(self, image: np.ndarray) -> dict[str, Any]:
        # A Compose draws once to decide whether it runs (p=1: always); the second part is
        # forced instead, so the pair draws exactly what one Compose of all steps would.
        if self.rest.transforms:
            image = self.rest(image=image, force_apply=True)["image"]
        return {"image": normalise_to_tensor(image, self.mean, self.scale)}

    def from_raw(self, raw: np.ndarray, in_chans: int, intensity: str = "dtype") -> dict[str, Any]:
        """Transform decoded pixels (`read_raw`: [H, W] or [H, W, C], any integer type)."""
        span = intensity_range(raw, intensity) if raw.dtype in _INTEGER_TYPES else None
        if span is None or (self._fills and span[0] != 0.0):  # float path; see _fills
            pixels = match_channels(scale_intensity(raw, intensity), in_chans)
            return self(image=np.ascontiguousarray(pixels, dtype=np.float32))
        if raw.ndim == 3 and raw.shape[2] == 4 and in_chans != 4:
            raw = raw[:, :, :3]  # drop alpha before resampling it
        raw = self.geometric(image=np.ascontiguousarray(raw))["image"]  # [h, w(, C)], integers
        channels = 1 if raw.ndim == 2 else raw.shape[2]
        if (
            self.delivers_integers(intensity)
            and raw.dtype in _DELIVERED
            and channels in (1, in_chans)
        ):
            return {"image": _integer_tensor(raw, in_chans)}
        if not self.rest.transforms and channels in (1, in_chans):  # nothing between: fuse
            return {"image": self._scale_and_normalise(raw, span, in_chans)}
        pixels = match_channels(scale_to_range(raw, *span), in_chans)
        return self._rest(np.ascontiguousarray(pixels, dtype=np.float32))

    def delivers_integers(self, intensity: str) -> bool:
        """Whether `from_raw` returns uint8 / uint16 images un-normalised (see `integers`)."""
        return self.integers and not self.rest.transforms and intensity == "dtype"

    def _scale_and_normalise(
        self, raw: np.ndarray, span: tuple[float, float], in_chans: int
    ) -> torch.Tensor:
        """`normalise_to_tensor(match_channels(scale_to_range(raw, *span)))` in one multiply
        and one add per channel: ((raw - low) / (high - low) - mean) * scale = raw * a + b."""
        low, high = span
        raw = raw[:, :, None] if raw.ndim == 2 else raw  # [h, w, 1 or in_chans]
        height, width = raw.shape[:2]
        out = np.empty((in_chans, height, width), np.float32)  # [C, h, w]
        for c in range(in_chans):
            k = c if len(self.mean) > 1 else 0
            a = self.scale[k] / np.float32(high - low) if high > low else np.float32(0.0)
            b = -(np.float32(low) * a) - self.mean[k] * self.scale[k]
            np.multiply(raw[:, :, c if raw.shape[2] > 1 else 0], a, out=out[c], dtype=np.float32)
            out[c] += b
        return torch.from_numpy(out)


def _integer_tensor(raw: np.ndarray, in_chans: int) -> torch.Tensor:
    """[h, w(, 1 or in_chans)] integers -> contiguous [in_chans, h, w] of the same dtype (a grey
    image repeated to every channel, as `match_channels` does)."""
    raw = raw[:, :, None] if raw.ndim == 2 else raw
    chw = raw.transpose(2, 0, 1)  # [1 or in_chans, h, w]
    if chw.shape[0] != in_chans:
        chw = np.broadcast_to(chw, (in_chans, *chw.shape[1:]))
    return torch.from_numpy(np.ascontiguousarray(chw))


def seed_augmentation(
    transform: A.BaseCompose | IntegerFirst | None, seed: np.random.SeedSequence
) -> None:
    """Give a pipeline its own random streams, derived from `seed`.

    Albumentations 2 draws from generators it keeps itself, so `torch.manual_seed` and
    Lightning's `seed_everything` do not reach it. One numpy and one Python generator are
    shared by every transform of the pipeline (`set_random_state`), rather than one per
    transform seeded alike (`set_random_seed(int)`), whose draws would be identical.
    """
    if transform is None:
        return
    numpy_seed, python_seed = seed.spawn(2)
    transform.set_random_state(
        np.random.default_rng(numpy_seed), random.Random(int(python_seed.generate_state(1)[0]))
    )


def _preset(name: str, height: int, width: int) -> list[A.BasicTransform]:
    """Named presets. `strong` follows RandAugment: two random ops per image, then erasing."""
    crop = A.RandomResizedCrop
    if name == "none":
        return [A.Resize(height, width)]
    if name == "light":
        return [crop(size=(height, width), scale=(0.5, 1.0)), A.HorizontalFlip(p=0.5)]
    if name == "strong":
        return [
            crop(size=(height, width), scale=(0.08, 1.0)),
            A.HorizontalFlip(p=0.5),
            A.SomeOf(
                [
                    A.RandomBrightnessContrast(0.3, 0.3, p=1.0),
                    A.Affine(rotate=(-30, 30), p=1.0),
                    A.Affine(shear=(-15, 15), p=1.0),
                    A.Affine(translate_percent=(-0.2, 0.2), p=1.0),
                    A.Sharpen(p=1.0),
                    A.GaussianBlur(blur_limit=(3, 5), p=1.0),
                    A.Solarize(threshold_range=(0.5, 0.5), p=1.0),
                    A.RandomGamma(gamma_limit=(70, 150), p=1.0),
                ],
                n=2,
            ),
            A.CoarseDropout(
                num_holes_range=(1, 1),
                hole_height_range=(0.1, 0.4),
                hole_width_range=(0.1, 0.4),
                p=0.25,
            ),
        ]
    if name == "medical":
        # Mild geometry (anatomy keeps its orientation: no flips) and intensity changes that
        # mimic acquisition differences between scanners, relative to each image's own range
        # (12-bit scanners store their data in 16-bit files).
        return [
            A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-10, 10), p=0.7),
            crop(size=(height, width), scale=(0.8, 1.0), ratio=(0.9, 1.1)),
            InImageRange(
                [
                    A.RandomBrightnessContrast(0.1, 0.1, p=0.5),
                    A.RandomGamma(gamma_limit=(85, 115), p=0.5),
                    A.GaussNoise(std_range=(0.0, 0.02), p=0.3),
                ]
            ),
        ]
    raise RecipeError(f"unknown augment.preset {name!r}; use none, light, strong or medical")


def _explicit(specs: list, height: int, width: int) -> list[A.BasicTransform]:
    """Transforms named in the recipe, looked up only among albumentations' own classes."""
    known = {
        n
        for n in dir(A)
        if isinstance(getattr(A, n), type) and issubclass(getattr(A, n), A.BasicTransform)
    }
    pipeline = []
    for spec in specs:
        kwargs = spec.model_dump(exclude={"name"})
        if spec.name not in known:
            guess = difflib.get_close_matches(spec.name, sorted(known), n=1)
            hint = (
                f"did you mean {guess[0]}?" if guess else "see albumentations' list of transforms"
            )
            raise RecipeError(
                f"augment.transforms: unknown albumentations transform {spec.name!r}; {hint}"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)  # albumentations warns on bad arguments
                pipeline.append(getattr(A, spec.name)(**kwargs))
        except (TypeError, ValueError, UserWarning) as err:
            message = str(err).splitlines()[0]
            raise RecipeError(
                f"augment.transforms: {spec.name}({kwargs}) is invalid: {message}"
            ) from None
    return [*pipeline, A.Resize(height, width)]  # guarantee the model's input size


def build_train_transform(
    cfg: AugmentConfig,
    img_size: int | tuple[int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> A.Compose | IntegerFirst:
    """A preset as an `IntegerFirst` (it can start on the decoded integers); an explicit
    `augment.transforms` list as one float-only pipeline, since its steps may be anything."""
    height, width = tuple(to_2tuple(img_size))
    if cfg.transforms is not None:
        finish = [A.Normalize(mean=mean, std=std, max_pixel_value=1.0), ToTensorV2()]
        return A.Compose([*_explicit(cfg.transforms, height, width), *finish])
    ops = _preset(cfg.preset, height, width)
    split = next((i for i, op in enumerate(ops) if not isinstance(op, _GEOMETRIC)), len(ops))
    return IntegerFirst(ops[:split], ops[split:], mean, std)


def build_eval_transform(
    img_size: int | tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]
) -> A.Compose:
    height, width = tuple(to_2tuple(img_size))
    return A.Compose(
        [
            A.Resize(height, width),
            A.Normalize(mean=mean, std=std, max_pixel_value=1.0),
            ToTensorV2(),
        ]
    )
