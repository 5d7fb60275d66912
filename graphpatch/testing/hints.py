"""Config values no rule in ``small_configs`` can derive, per architecture:
data only, read in one place. Each entry is merged into the architecture's
derived small config (a nested config is merged into, not replaced).
"""

from typing import Any

# Values no type can guess: rope dicts read by key, a layer pattern that needs
# more than 2 layers, MLA ranks whose defaults are too large.
YARN = {
    "type": "yarn",
    "factor": 1.0,
    "mscale": 1,
    "mscale_all_dim": 0,
    "beta_fast": 32,
    "beta_slow": 1,
    "original_max_position_embeddings": 512,
}
LLAMA4_ROPE = {
    "rope_type": "default",
    "rope_theta": 10000.0,
    "llama_4_scaling_beta": 0.1,
    "original_max_position_embeddings": 512,
}
HYBRID = {"full_attention_interval": 2, "num_hidden_layers": 4}
LFM2 = {
    "block_dim": 256,
    "block_ff_dim": 512,
    "block_multiple_of": 16,
    "block_ffn_dim_multiplier": 1.0,
    "block_auto_adjust_ff_dim": False,
    "conv_L_cache": 3,
}
# rope parameters per layer type, for the types small_config lists
PER_TYPE_ROPE = {
    "rope_parameters": {
        kind: {"rope_type": "default", "rope_theta": 10000.0}
        for kind in ("sliding_attention", "full_attention")
    }
}
GEMMA4 = {
    "num_kv_shared_layers": 0,
    "vocab_size_per_layer_input": 256,
    "hidden_size_per_layer_input": 128,
}
HINTS: dict[str, dict[str, Any]] = {
    "mellum": PER_TYPE_ROPE,
    "glm_moe_dsa": {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}},
    "hunyuan": {"rope_scaling": {"alpha": 1.0, "factor": 1.0, "type": "dynamic"}},
    "minicpm3": {"rope_scaling": {"original_max_position_embeddings": 512}},
    "openelm": {
        "num_query_heads": [4, 4],
        "num_kv_heads": [2, 2],
        "ffn_multipliers": [2.0, 2.0],
        "ffn_dim_divisor": 64,
        "num_transformer_layers": 2,
        "model_dim": 256,
    },
    "recurrent_gemma": {
        "block_types": ["recurrent", "attention"],
        "attention_window_size": 64,
        "logits_soft_cap": 30.0,
    },
    "spark2_5": PER_TYPE_ROPE,
    "afm7": {"num_layers": 4, "num_kv_reuse_layers": 2},
    # mlx-lm sets these scales only when true (false leaves them unset)
    "longcat_flash": {
        "mla_scale_q_lora": True,
        "mla_scale_kv_lora": True,
        "zero_expert_type": "identity",
    },
    "longcat_flash_ngram": {"mla_scale_q_lora": True, "mla_scale_kv_lora": True},
    "bailing_moe_v3": {"n_group": 2, "topk_group": 1},
    "kimi_linear": {  # layer 1 (1-based) is linear attention, layer 2 full
        "linear_attn_config": {"kda_layers": [1], "num_heads": 4, "head_dim": 64}
    },
    "kimi_k3": {  # as kimi_linear, with MLA ranks and experts per token
        "text_config": {
            "linear_attn_config": {
                "kda_layers": [1],
                "num_heads": 4,
                "head_dim": 64,
                "short_conv_kernel_size": 4,
            },
            "q_lora_rank": 32,
            "kv_lora_rank": 32,
            "qk_nope_head_dim": 32,
            "qk_rope_head_dim": 16,
            "v_head_dim": 32,
            "num_experts_per_token": 2,
        }
    },
    "muse_spark": {  # rope by layer; every MLP sparse (dense ones are refused)
        "text_config": {
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "layer_rope_theta": [10000.0, 10000.0],
            "layer_types": ["sliding_attention", "full_attention"],
            "mlp_layer_types": ["sparse", "sparse"],
            "moe_hidden_size": 64,
        }
    },
    # a text pack (schema 1) with one 2-bit module, rotated in blocks of 512
    "prism_hadamard_qwen35": {
        "schema_version": 1,
        "tensor_namespace": "mlx-lm-text",
        "quantization": {"bits": 2, "group_size": 128, "mode": "affine"},
        "modules": [
            {
                "path": "model.layers.2.linear_attn.out_proj",
                "embedding": False,
                "dtype": "float16",
                "block": 512,
            }
        ],
        "text_config": HYBRID,
    },
    # its forward writes -inf at token ids up to 100351, unchecked: a smaller
    # vocabulary made that write corrupt memory (a double free, a segfault)
    "phi3small": {"vocab_size": 100352, "hidden_size": 64},
    "nemotron-nas": {
        "block_configs": [
            {"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 2.0}}
        ]
        * 2
    },
    "dbrx": {
        "ffn_config": {"ffn_hidden_size": 128, "moe_num_experts": 8, "moe_top_k": 2},
        "attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
    },
    "exaone4": {"sliding_window_pattern": "LG"},  # a string: L local, G global
    # per-layer inputs narrower than VOCAB in all (2 x 256 would pass for
    # a vocabulary projection)
    "gemma4": {"text_config": GEMMA4},
    "gemma4_text": GEMMA4,
    "llama4": {  # its global mask reads layer 3's cache
        "text_config": {
            "rope_scaling": None,
            "num_experts_per_tok": 1,
            "num_hidden_layers": 4,
            "no_rope_layers": [1, 1, 1, 0],
        }
    },
    "mimo_v2_flash": {
        "topk_method": "noaux_tc",
        "n_group": 1,
        "topk_group": 1,
        "v_head_dim": 64,
        "swa_num_attention_heads": 4,
        "swa_num_key_value_heads": 2,
        "swa_head_dim": 64,
        "swa_v_head_dim": 64,
    },
    "plamo": {"n_shared_head": 2},
    "gemma3n": {
        "text_config": {
            "num_kv_shared_layers": 0,
            "layer_types": ["sliding_attention", "full_attention"],
            "activation_sparsity_pattern": [0.0, 0.0],
            "hidden_size_per_layer_input": 64,
            "vocab_size_per_layer_input": 256,
            "altup_num_inputs": 2,
            "altup_coef_clip": 120.0,
            "altup_correct_scale": True,
            "altup_active_idx": 0,
            "laurel_rank": 8,
            "rope_local_base_freq": 10000.0,
            "final_logit_softcapping": 30.0,
        }
    },
    "granitemoehybrid": {
        "layer_types": ["mamba", "attention"],
        "mamba_n_heads": 8,
        "mamba_d_head": 64,
        "mamba_d_state": 16,
        "mamba_d_conv": 4,
        "mamba_n_groups": 1,
        "mamba_proj_bias": False,
        "mamba_conv_bias": True,
        "shared_intermediate_size": 256,
    },
    "nemotron_h": {"layers_block_type": ["mamba", "attention"]},
    "lfm2": LFM2,
    "lfm2_moe": LFM2,
    "lfm2-vl": {"text_config": {"model_type": "lfm2", **LFM2}},
    "mamba2": {
        "num_heads": 8,
        "head_dim": 64,
        "intermediate_size": 512,
        "state_size": 16,
        "n_groups": 1,
        "conv_kernel": 4,
        "time_step_limit": [0.0, float("inf")],
        "time_step_rank": 16,
    },
    "deepseek_v2": {"rope_scaling": YARN},
    "deepseek_v32": {
        "rope_scaling": YARN,
        "kv_lora_rank": 32,
        "q_lora_rank": 32,
        "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 32,
        "v_head_dim": 32,
        "index_head_dim": 32,
        "index_n_heads": 4,
        "index_topk": 16,
    },
    "ministral3": {"rope_parameters": LLAMA4_ROPE},
    "mistral4": {"rope_parameters": LLAMA4_ROPE},
    "qwen3_next": HYBRID,
    "qwen3_5": {"text_config": HYBRID},
    "qwen3_5_moe": {"text_config": HYBRID},
}
