"""Mixup and CutMix on device, in jax.numpy, so they run inside the jitted train step."""

import jax
import jax.numpy as jnp


def mixup_cutmix(
    rng: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    num_classes: int,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Mixes a batch with its reverse, like timm's Mixup in 'batch' mode; jit-able.

    One lambda is drawn per batch from Beta(alpha, alpha). With both alphas positive, CutMix is used with
    probability `switch_prob` and Mixup otherwise. CutMix pastes a box of area about (1 - lambda) from the partner
    image and recomputes lambda from the clipped box, so the labels match the pixels.

    Args:
      rng: a jax PRNG key.
      images: (B, H, W, C) NHWC float images.
      labels: (B,) integer class ids.
      num_classes: the width of the returned label vectors.
      mixup_alpha: Beta parameter for Mixup; 0 disables Mixup.
      cutmix_alpha: Beta parameter for CutMix; 0 disables CutMix.
      switch_prob: probability of CutMix when both are enabled.
      label_smoothing: smoothing applied to the one-hot labels before mixing.

    Returns:
      (images with the same shape and dtype, float32 soft labels (B, num_classes) that sum to 1).
    """
    off_value = label_smoothing / num_classes
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - label_smoothing) + off_value
    if mixup_alpha <= 0.0 and cutmix_alpha <= 0.0:
        return images, targets

    rng_switch, rng_mixup, rng_cutmix, rng_y, rng_x = jax.random.split(rng, 5)
    partner = images[::-1]
    lam_mixup = jax.random.beta(rng_mixup, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.float32(1.0)
    lam_cutmix = jax.random.beta(rng_cutmix, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.float32(1.0)
    if cutmix_alpha <= 0:
        use_cutmix = jnp.bool_(False)
    elif mixup_alpha <= 0:
        use_cutmix = jnp.bool_(True)
    else:
        use_cutmix = jax.random.uniform(rng_switch) < switch_prob

    height, width = images.shape[1:3]
    cut_ratio = jnp.sqrt(1.0 - lam_cutmix)
    cut_height = (height * cut_ratio).astype(jnp.int32)
    cut_width = (width * cut_ratio).astype(jnp.int32)
    center_y = jax.random.randint(rng_y, (), 0, height)
    center_x = jax.random.randint(rng_x, (), 0, width)
    top, bottom = jnp.clip(center_y - cut_height // 2, 0, height), jnp.clip(center_y + cut_height // 2, 0, height)
    left, right = jnp.clip(center_x - cut_width // 2, 0, width), jnp.clip(center_x + cut_width // 2, 0, width)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    box_lam = 1.0 - ((bottom - top) * (right - left)).astype(jnp.float32) / (height * width)

    cut_images = jnp.where(inside[None, :, :, None], partner, images)
    mixed_images = (lam_mixup * images + (1.0 - lam_mixup) * partner).astype(images.dtype)
    out_images = jnp.where(use_cutmix, cut_images, mixed_images)
    lam = jnp.where(use_cutmix, box_lam, lam_mixup).astype(jnp.float32)
    return out_images, lam * targets + (1.0 - lam) * targets[::-1]
