"""MoE-LLaVA for one checkpoint made by tools/gen_checkpoint.py, assembled from the upstream libraries'
own model classes (transformers 4.46.3; MoE-LLaVA pins 4.37.0, which predates StableLmForCausalLM):

- vision: transformers' CLIPVisionModel / SiglipVisionModel, hidden_states[mm_vision_select_layer],
  `[:, 1:]` for select_feature "patch" (also on SigLIP, dropping a real patch: spec §0.7);
- projector: Linear → nn.GELU() (erf) → Linear (mlp2x_gelu);
- language model: PhiForCausalLM, StableLmForCausalLM, and for Qwen-1 Qwen2ForCausalLM with Qwen-1's
  weights mapped onto it: c_attn split into q/k/v (with their biases), c_proj → o_proj (no bias, as
  no_bias=true), ln_1/ln_2/ln_f → RMSNorm (same formula: x·rsqrt(mean(x²)+eps) in fp32, cast, ·weight),
  w2 → gate_proj and w1 → up_proj (Qwen-1 computes c_proj(w1(x)·silu(w2(x)))), full rotary with
  rotate_half on halves (Qwen-1's rearrange "(j d) -> j d", j=2 is the same), base rotary_emb_base.
  Exact for prompts shorter than seq_length (8192): Qwen-1's dynamic NTK and logn scaling only act above
  it (ntk_alpha = 1, logn = 1 below) — every fixture prompt is far shorter.
- MoE layers: the decoder layer's `mlp` replaced by moe.MoE (DeepSpeed 0.9.5 semantics), experts being
  instances of the family's own MLP class with the expert weights;
- the vocabulary cut to len(tokenizer) (builder.py resize_token_embeddings); Phi's lm_head bias zero
  (MoE-LLaVA's lm_head has none; transformers' PhiForCausalLM has one).
"""
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from moe import MoE
from preprocess import IMAGE_TOKEN_INDEX, FamilyTokenizer

FAMILIES = {"moe_llava_phi": "phi2", "llava_phi": "phi2", "moe_llava_stablelm": "stablelm", "llava_stablelm": "stablelm",
            "moe_llava_qwen": "qwen", "llava_qwen": "qwen"}


def load_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return sorted({model_dir / s for s in json.loads(index.read_text())["weight_map"].values()})
    return [model_dir / "model.safetensors"]


class Reference(nn.Module):
    def __init__(self, root: Path, dtype: torch.dtype = torch.float32, overrides: dict | None = None):
        """`overrides` replace config.json fields (the self-test's deliberate mistakes)."""
        super().__init__()
        self.root, self.dtype = root, dtype
        model_dir = root / "model"
        cfg = json.loads((model_dir / "config.json").read_text())
        cfg.update(overrides or {})
        self.cfg = cfg
        self.family = FAMILIES[cfg["model_type"]]
        self.tok = FamilyTokenizer(self.family, model_dir)
        w = {k: v.to(dtype) for k, v in load_safetensors(checkpoint_files(model_dir)).items()}
        self.tower_dir = root / cfg["mm_image_tower"]
        self._build_vision(dtype)
        self._build_llm(w, dtype)
        pre = "transformer" if self.family == "qwen" else "model"
        h, mm = cfg["hidden_size"], cfg["mm_hidden_size"]
        self.projector = nn.Sequential(nn.Linear(mm, h), nn.GELU(), nn.Linear(h, h)).to(dtype)
        p = f"{pre}.mm_projector.image_spatial_proj"
        self.projector.load_state_dict({"0.weight": w[f"{p}.0.weight"], "0.bias": w[f"{p}.0.bias"],
                                        "2.weight": w[f"{p}.2.weight"], "2.bias": w[f"{p}.2.bias"]})
        self.eval()

    # ------------------------------------------------------------------ vision
    def _build_vision(self, dtype):
        tcfg = json.loads((self.tower_dir / "config.json").read_text())
        vision = tcfg.get("vision_config", tcfg)
        tw = load_safetensors([self.tower_dir / "model.safetensors"])
        sd = {k[len("vision_model."):]: v.to(dtype) for k, v in tw.items() if k.startswith("vision_model.") and "position_ids" not in k}
        if tcfg["model_type"].startswith("clip"):
            from transformers import CLIPVisionConfig, CLIPVisionModel
            self.tower_kind = "clip"
            model = CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in vision.items() if k != "model_type"}, attn_implementation="eager"))
        else:
            from transformers import SiglipVisionConfig, SiglipVisionModel
            self.tower_kind = "siglip"
            model = SiglipVisionModel(SiglipVisionConfig(**{k: v for k, v in vision.items() if k != "model_type"}, attn_implementation="eager"))
        missing, unexpected = model.vision_model.load_state_dict(sd, strict=False)
        missing = [m for m in missing if "position_ids" not in m]
        assert not missing and not unexpected, (missing, unexpected)
        self.vision = model.to(dtype)

    # ------------------------------------------------------------------ language model
    def _build_llm(self, w: dict, dtype):
        c, n = self.cfg, self.tok.len
        common = dict(vocab_size=n, hidden_size=c["hidden_size"], num_hidden_layers=c["num_hidden_layers"],
                      num_attention_heads=c["num_attention_heads"], max_position_embeddings=c["max_position_embeddings"],
                      tie_word_embeddings=False, attention_dropout=0.0, attn_implementation="eager")
        if self.family == "phi2":
            from transformers import PhiConfig, PhiForCausalLM
            from transformers.models.phi.modeling_phi import PhiMLP as Mlp
            config = PhiConfig(**common, intermediate_size=c["intermediate_size"], num_key_value_heads=c.get("num_key_value_heads"),
                               resid_pdrop=0.0, embd_pdrop=0.0, hidden_act=c["hidden_act"], layer_norm_eps=c["layer_norm_eps"],
                               partial_rotary_factor=c["partial_rotary_factor"], rope_theta=c["rope_theta"], qk_layernorm=False)
            model = PhiForCausalLM(config)
            sd = {k: v for k, v in w.items() if k.startswith("model.") and not any(s in k for s in ("mm_projector", "image_tower", "deepspeed_moe"))}
            sd["lm_head.weight"] = w["lm_head.weight"]
            sd["lm_head.bias"] = torch.zeros(n, dtype=dtype)
            layers = model.model.layers
            expert_names = lambda e, i: {f"fc1.{s}": f"model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.fc1.{s}" for s in ("weight", "bias")} | \
                {f"fc2.{s}": f"model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.fc2.{s}" for s in ("weight", "bias")}
            gate_name = lambda i: f"model.layers.{i}.mlp.deepspeed_moe.gate.wg.weight"
        elif self.family == "stablelm":
            from transformers import StableLmConfig, StableLmForCausalLM
            from transformers.models.stablelm.modeling_stablelm import StableLmMLP as Mlp
            config = StableLmConfig(**common, intermediate_size=c["intermediate_size"], num_key_value_heads=c["num_key_value_heads"],
                                    hidden_act=c["hidden_act"], layer_norm_eps=c["norm_eps"], rope_theta=c["rope_theta"],
                                    partial_rotary_factor=c["rope_pct"], use_qkv_bias=c["use_qkv_bias"], qk_layernorm=False,
                                    use_parallel_residual=False, hidden_dropout=0.0)
            model = StableLmForCausalLM(config)
            sd = {k: v for k, v in w.items() if k.startswith("model.") and not any(s in k for s in ("mm_projector", "image_tower", "deepspeed_moe"))}
            sd["lm_head.weight"] = w["lm_head.weight"]
            layers = model.model.layers
            expert_names = lambda e, i: {f"{p}.weight": f"model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.{p}.weight"
                                         for p in ("gate_proj", "up_proj", "down_proj")}
            gate_name = lambda i: f"model.layers.{i}.mlp.deepspeed_moe.gate.wg.weight"
        else:
            from transformers import Qwen2Config, Qwen2ForCausalLM
            from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP as Mlp
            config = Qwen2Config(**common, intermediate_size=c["intermediate_size"] // 2, num_key_value_heads=c["num_attention_heads"],
                                 hidden_act="silu", rms_norm_eps=c["layer_norm_epsilon"], rope_theta=c["rotary_emb_base"],
                                 use_sliding_window=False)
            model = Qwen2ForCausalLM(config)
            sd = {"model.embed_tokens.weight": w["transformer.wte.weight"], "model.norm.weight": w["transformer.ln_f.weight"],
                  "lm_head.weight": w["lm_head.weight"]}
            h = c["hidden_size"]
            for i in range(c["num_hidden_layers"]):
                p, q = f"transformer.h.{i}", f"model.layers.{i}"
                qw, kw, vw = w[f"{p}.attn.c_attn.weight"].split(h, dim=0)
                qb, kb, vb = w[f"{p}.attn.c_attn.bias"].split(h, dim=0)
                sd.update({f"{q}.self_attn.q_proj.weight": qw, f"{q}.self_attn.k_proj.weight": kw, f"{q}.self_attn.v_proj.weight": vw,
                           f"{q}.self_attn.q_proj.bias": qb, f"{q}.self_attn.k_proj.bias": kb, f"{q}.self_attn.v_proj.bias": vb,
                           f"{q}.self_attn.o_proj.weight": w[f"{p}.attn.c_proj.weight"],
                           f"{q}.input_layernorm.weight": w[f"{p}.ln_1.weight"], f"{q}.post_attention_layernorm.weight": w[f"{p}.ln_2.weight"]})
                if f"{p}.mlp.w1.weight" in w:
                    sd.update({f"{q}.mlp.gate_proj.weight": w[f"{p}.mlp.w2.weight"], f"{q}.mlp.up_proj.weight": w[f"{p}.mlp.w1.weight"],
                               f"{q}.mlp.down_proj.weight": w[f"{p}.mlp.c_proj.weight"]})
            layers = model.model.layers
            expert_names = lambda e, i: {
                "gate_proj.weight": f"transformer.h.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.w2.weight",
                "up_proj.weight": f"transformer.h.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.w1.weight",
                "down_proj.weight": f"transformer.h.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.c_proj.weight"}
            gate_name = lambda i: f"transformer.h.{i}.mlp.deepspeed_moe.gate.wg.weight"
        # builder.py: resize_token_embeddings(len(tokenizer)).
        sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"][:n]
        sd["lm_head.weight"] = sd["lm_head.weight"][:n]
        moe = c.get("moe")
        moe_layers = moe["moe_layers_idx"] if moe else []
        self.moe_modules: dict[int, MoE] = {}
        for i in moe_layers:
            experts = []
            for e in range(moe["num_experts"][0]):
                mlp = Mlp(config)
                mlp.load_state_dict({k: w[v] for k, v in expert_names(e, i).items()})
                experts.append(mlp)
            layers[i].mlp = MoE(w[gate_name(i)], experts, moe["eval_capacity_factor"], moe["min_capacity"])
            self.moe_modules[i] = layers[i].mlp
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [m for m in missing if not any(f"layers.{i}.mlp." in m for i in moe_layers) and "rotary_emb" not in m]
        assert not missing and not unexpected, (missing, unexpected)
        self.llm = model.to(dtype)
        self.layer_outputs: list[torch.Tensor] = []
        for layer in layers:
            layer.register_forward_hook(lambda _m, _i, out: self.layer_outputs.append(out[0] if isinstance(out, tuple) else out))

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels [3, H, W] → (selected vision features [N, W], image embeddings [N, H])."""
        out = self.vision(pixels[None].to(self.dtype), output_hidden_states=True)
        feats = out.hidden_states[self.cfg.get("mm_vision_select_layer", -2)]
        if self.cfg.get("mm_vision_select_feature", "patch") == "patch":
            feats = feats[:, 1:]
        return feats[0], self.projector(feats)[0]

    @torch.no_grad()
    def embed(self, ids: list[int], image_embeds: torch.Tensor | None) -> torch.Tensor:
        """prepare_inputs_labels_for_multimodal: text chunks embedded, image features spliced at -200."""
        table = self.llm.get_input_embeddings()
        parts, run = [], []
        for t in ids:
            if t == IMAGE_TOKEN_INDEX:
                if run:
                    parts.append(table(torch.tensor(run)))
                    run = []
                parts.append(image_embeds)
            else:
                run.append(t)
        if run:
            parts.append(table(torch.tensor(run)))
        return torch.cat(parts, dim=0)[None]

    @torch.no_grad()
    def generate(self, embeds: torch.Tensor, n_new: int, noise: dict | None = None):
        """Greedy decoding with a KV cache. Returns (step logits [n_new, V] fp32 — step 0 is the last
        prompt position —, tokens, layer outputs of the prefill, routing trace of the prefill)."""
        from transformers import DynamicCache
        for m in self.moe_modules.values():
            m.trace = []
        for i, m in self.moe_modules.items():
            m.noise = None if noise is None else noise[i]
        self.layer_outputs = []
        cache = DynamicCache()
        out = self.llm(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
        prefill_layers = [t[0].float() for t in self.layer_outputs]
        routing = {i: m.trace[0] for i, m in self.moe_modules.items()}
        for m in self.moe_modules.values():
            m.noise = None
        logits, tokens = [], []
        step = out.logits[0, -1].float()
        for k in range(n_new):
            logits.append(step)
            tok = int(torch.argmax(step))
            tokens.append(tok)
            if k + 1 == n_new:
                break
            out = self.llm(input_ids=torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
            step = out.logits[0, -1].float()
        return torch.stack(logits), tokens, prefill_layers, routing
