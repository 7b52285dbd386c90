"""Configuration of the HunyuanImage-3.0 test model (tiny stand-in, same field names)."""

from __future__ import annotations

from transformers import PretrainedConfig


class HunyuanImage3Config(PretrainedConfig):
    """Config with the real model's field names; defaults are the tiny test sizes.

    ``moe_topk``, ``moe_intermediate_size`` and ``num_shared_expert`` may be an int or
    a per-layer list, as in the real config.
    """

    model_type = "hunyuan_image_3_moe"

    def __init__(
        self,
        vocab_size: int = 320,
        hidden_size: int = 64,
        intermediate_size: int = 48,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        attention_head_dim: int = 16,
        hidden_act: str = "silu",
        max_position_embeddings: int = 12800,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        initializer_range: float = 0.1,
        router_init_std: float = 0.3,
        use_qk_norm: bool = True,
        num_experts: int = 8,
        moe_topk: int | list[int] = 2,
        moe_intermediate_size: int | list[int] = 64,  # real 3072: multiples of 64 (bnb 4-bit blocks)
        num_shared_expert: int | list[int] = 1,
        moe_drop_tokens: bool = False,
        capacity_factor: float = 1.0,
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 1.0,
        moe_impl: str = "eager",
        vae_latent_channels: int = 32,
        vae_downsample_factor: list[int] | None = None,
        vae_scaling_factor: float = 0.5,
        patch_size: int = 4,
        patch_embed_hidden_dim: int = 32,
        image_base_size: int = 1024,
        vit_hidden_size: int = 32,
        vit_patch_size: int = 16,
        vit_image_size: int = 64,
        vit_type: str = "siglip2-so400m-patch16-naflex",
        vit_processor: dict | None = None,
        cond_image_type: str = "vae_vit",
        cond_token_attn_type: str = "full",
        model_version: str = "HunyuanImage-3.0",
        cfg_distilled: bool = False,
        use_meanflow: bool = False,
        bos_token_id: int = 257,
        eos_token_id: int = 258,
        pad_token_id: int = 256,
        tie_word_embeddings: bool = False,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.attention_head_dim = attention_head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        self.router_init_std = router_init_std
        self.use_qk_norm = use_qk_norm
        self.num_experts = num_experts
        self.moe_topk = moe_topk
        self.moe_intermediate_size = moe_intermediate_size
        self.num_shared_expert = num_shared_expert
        self.moe_drop_tokens = moe_drop_tokens
        self.capacity_factor = capacity_factor
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.moe_impl = moe_impl
        self.vae_latent_channels = vae_latent_channels
        self.vae_downsample_factor = list(vae_downsample_factor or [16, 16])
        self.vae_scaling_factor = vae_scaling_factor
        self.patch_size = patch_size
        self.patch_embed_hidden_dim = patch_embed_hidden_dim
        self.image_base_size = image_base_size
        self.vit_hidden_size = vit_hidden_size
        self.vit_patch_size = vit_patch_size
        self.vit_image_size = vit_image_size
        self.vit_type = vit_type
        # Kwargs of transformers' Siglip2 image processor, as in the real config (max_num_patches: ViT tokens
        # per reference image; real 1024-ish, here tiny).
        self.vit_processor = dict(vit_processor or {
            "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "patch_size": vit_patch_size, "max_num_patches": (vit_image_size // vit_patch_size) ** 2,
        })
        self.cond_image_type = cond_image_type
        self.cond_token_attn_type = cond_token_attn_type
        self.model_version = model_version
        self.cfg_distilled = cfg_distilled
        self.use_meanflow = use_meanflow
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def layer_value(self, name: str, layer_idx: int):
        """Value of a field that may be an int or a per-layer list."""
        value = getattr(self, name)
        if isinstance(value, (list, tuple)):
            return value[layer_idx] if layer_idx < len(value) else value[-1]
        return value
