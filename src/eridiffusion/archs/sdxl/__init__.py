"""SDXL on diffusers' UNet2DConditionModel: DDPM noise (or v) prediction on 4-channel latents,
conditioned on CLIP-L + OpenCLIP-G penultimate states, the pooled OpenCLIP-G embedding and the
size/crop `time_ids` of each image. LoRA files in kohya's layout (`lora_unet_`, `lora_te1_`, `lora_te2_`)."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler, LMSDiscreteScheduler, PNDMScheduler,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from ...adapters.kohya import from_kohya, to_kohya
from ...objectives import ddpm
from ...objectives.flow import per_sample_mse
from ...train.dtypes import DTYPES
from ..base import LoraTargets, SampleRequest
from ..blockwise import FrozenBase, finish_loaded
from ..common import (encode_latents, folder_fingerprint, load_vae, on_device, require_diffusers_folder,
                     save_lora_with_diffusers, write_diffusers_folder)
from ..sources import resolve_model_source

# sample.sampler -> (diffusers scheduler, extra config); built from the model's own scheduler config
SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "ddpm": (DDPMScheduler, {}), "ddim": (DDIMScheduler, {}), "pndm": (PNDMScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}), "heun": (HeunDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}), "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmsolver": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver"}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "k_dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
}
NOISE_SCHEDULERS = ("ddpm", "ddim", "euler", "euler_a", "dpmsolver", "dpmsolver++", "lms", "pndm", "heun")
FILE_PREFIXES = {"unet": "lora_unet", "te1": "lora_te1", "te2": "lora_te2"}
TE_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # kohya's CLIP targets


class SDXL:
    base_model_version = "sdxl_1.0"
    # the UNet has no long run of identical blocks to swap; each top-level part is one loading unit
    block_lists: tuple[str, ...] = ()
    # kept in full precision when the base is quantized: the timestep and micro-conditioning embeddings
    quantize_exclude = ["time_embedding*", "add_embedding*"]
    components = ["unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"]
    te_keys, te_linears = ("te1", "te2"), TE_LINEARS
    model_kwargs: dict = {}  # the model.model_kwargs this architecture reads
    attention_kernel = "flash"  # SDPA's kernel tried first (train/attention.py): cuDNN's took 11 % more step time (H200)

    def __init__(self, proc, device: torch.device, dtype: torch.dtype):
        self.model_cfg, self.train_cfg, self.sample_cfg = proc.model, proc.train, proc.sample
        self.device, self.dtype = device, dtype
        tc = self.train_cfg
        if tc.noise_scheduler not in NOISE_SCHEDULERS:
            raise ValueError(f"train.noise_scheduler '{tc.noise_scheduler}': {type(self).__name__.lower()} is a "
                             f"noise-prediction model; use one of {', '.join(NOISE_SCHEDULERS)} (they share DDPM noising)")
        if self.sample_cfg is not None and self.sample_cfg.sampler not in SAMPLERS:
            raise ValueError(f"sample.sampler '{self.sample_cfg.sampler}' is not supported yet (supported: {', '.join(SAMPLERS)})")
        if tc.bypass_guidance_embedding:
            raise ValueError("train.bypass_guidance_embedding applies to guidance-distilled flow models, not to UNets")

    @staticmethod
    def build_tiny(folder, **kw):
        """A tiny random-weight model folder of this architecture, for tests and the demo."""
        from .tiny import build_tiny_sdxl

        return build_tiny_sdxl(folder, **kw)

    # ---- loading -------------------------------------------------------------------------------
    def load(self, base: FrozenBase | None = None) -> None:
        self.base = base or FrozenBase(self.device, self.dtype)
        source = resolve_model_source(self.model_cfg.name_or_path)
        if source.kind == "single_file":
            return self.load_single_file(source.path)
        root = require_diffusers_folder(str(source.path), self.components)
        self.components_root = root
        te_dtype = DTYPES[self.model_cfg.te_dtype or self.train_cfg.dtype]
        # SDXL's VAE overflows in fp16: unless vae_dtype says otherwise it encodes in fp32 (force_upcast models)
        force_upcast = AutoencoderKL.load_config(root, subfolder="vae", local_files_only=True).get("force_upcast", False)
        vae_dtype = DTYPES[self.model_cfg.vae_dtype] if self.model_cfg.vae_dtype else (
            torch.float32 if force_upcast else self.dtype)
        text_encoders, tokenizers = self.load_text(root, te_dtype)
        vae, vae_source = load_vae(self.model_cfg.vae_path, root, vae_dtype)  # e.g. an fp16-fix VAE
        self.attach(unet=UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=self.dtype, local_files_only=True),
                    scheduler=EulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True),
                    vae=vae, text_encoders=text_encoders, tokenizers=tokenizers)
        self.latent_fingerprint = folder_fingerprint(vae_source, extra=f"{type(self).__name__}:{vae_dtype}")
        self.text_fingerprint = folder_fingerprint(*(root / c for c in self.components if c.startswith(("text", "token"))),
                                                   extra=f"{type(self).__name__}:{te_dtype}")

    def attach(self, *, unet, scheduler, vae=None, text_encoders=(), tokenizers=()) -> None:
        """Take loaded components (from `load()`, or built in memory by a benchmark) and place them."""
        self.unet, self.vae, self.text_encoders, self.tokenizers = unet, vae, list(text_encoders), list(tokenizers)
        self.base = getattr(self, "base", None) or FrozenBase(self.device, self.dtype)
        finish_loaded(unet.eval(), self.base, self.block_lists)
        for m in self.text_encoders:
            self.base.te_quantizer(m.requires_grad_(False))
        for m in (vae, *self.text_encoders):
            if m is not None:
                m.requires_grad_(False).eval().to(self.device)
        self.pipe = self.make_pipeline(scheduler) if vae is not None else None
        if self.pipe is not None:
            self.pipe.set_progress_bar_config(disable=True)
        self.noise_scheduler = ddpm.train_scheduler(dict(scheduler.config))
        self.prediction_type = "v_prediction" if self.model_cfg.is_v_pred else scheduler.config.prediction_type
        ddpm.check_prediction_type(self.prediction_type)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        # latents must halve cleanly at every UNet downsampling step; the pipelines want pixels divisible by 8
        self.bucket_divisibility = max(8, self.vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1))
        self.denoiser = unet
        self.unconditional = {}  # an empty negative prompt: SDXL's pipeline uses zeros (force_zeros_for_empty_prompt)

    def load_single_file(self, path) -> None:
        """An all-in-one checkpoint in SGM layout (UNet, VAE, both CLIPs); tokenizers from extras_name_or_path."""
        from .formats import load_sdxl_single_file

        extras = self.model_cfg.extras_name_or_path
        if not extras:
            raise FileNotFoundError(f"model.name_or_path is a single checkpoint file ({path}), which holds no tokenizers: set "
                                    "model.extras_name_or_path to a folder with tokenizer/ and tokenizer_2/ (vocab.json and "
                                    "merges.txt in each), e.g. an SDXL diffusers folder or a repo id in the local HF cache")
        te_dtype = DTYPES[self.model_cfg.te_dtype or self.train_cfg.dtype]
        vae_dtype = DTYPES[self.model_cfg.vae_dtype] if self.model_cfg.vae_dtype else torch.float32
        folder = resolve_model_source(extras, key="model.extras_name_or_path").path
        self.components_root = folder if (folder / "model_index.json").is_file() else None
        # component configs: the extras folder's when it has them, else the shipped SDXL base ones
        configs = folder if (folder / "text_encoder" / "config.json").is_file() else None
        parts = load_sdxl_single_file(path, tokenizer_folder=folder, config_folder=configs,
                                      dtype={"unet": self.dtype, "vae": vae_dtype, "text_encoder": te_dtype, "text_encoder_2": te_dtype})
        self.attach(unet=parts["unet"], scheduler=parts["scheduler"], vae=parts["vae"],
                    text_encoders=[parts["text_encoder"], parts["text_encoder_2"]], tokenizers=[parts["tokenizer"], parts["tokenizer_2"]])
        self.latent_fingerprint = folder_fingerprint(path, extra=f"{type(self).__name__}:{vae_dtype}")
        self.text_fingerprint = folder_fingerprint(path, extra=f"{type(self).__name__}:{te_dtype}")

    def load_text(self, root, te_dtype):
        load = dict(torch_dtype=te_dtype, local_files_only=True)
        encoders = [CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **load),
                    CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder_2", **load)]
        tokenizers = [AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True),
                      AutoTokenizer.from_pretrained(root / "tokenizer_2", local_files_only=True)]
        return encoders, tokenizers

    def make_pipeline(self, scheduler):
        (te1, te2), (tok1, tok2) = self.text_encoders, self.tokenizers
        return StableDiffusionXLPipeline(vae=self.vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                         tokenizer_2=tok2, unet=self.unet, scheduler=scheduler)

    def drop_text_encoders(self) -> None:
        for name in ("text_encoder", "text_encoder_2"):
            if hasattr(self.pipe, name):
                setattr(self.pipe, name, None)
        self.text_encoders = []

    def drop_vae_encoder(self) -> None:
        self.vae.to("cpu")

    # ---- conditioning --------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_latents(self.vae, pixels, self.dtype)

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        with torch.set_grad_enabled(self.train_cfg.train_text_encoder and torch.is_grad_enabled()):
            embeds, _, pooled, _ = self.pipe.encode_prompt(prompt=prompts, device=self.device, num_images_per_prompt=1,
                                                          do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    # ---- training ------------------------------------------------------------------------------
    def training_loss(self, latents, text, batch, generator):
        tc = self.train_cfg
        latents = latents.to(self.device, self.dtype)
        draw = ddpm.training_draw(self.noise_scheduler, latents, generator=generator, prediction_type=self.prediction_type,
                                  content_or_style=tc.content_or_style, min_step=tc.min_denoising_steps,
                                  max_step=tc.max_denoising_steps, noise_offset=tc.noise_offset,
                                  snr_gamma=tc.snr_gamma, min_snr_gamma=tc.min_snr_gamma)
        # SDXL's micro-conditioning: what the data pipeline really did to each image
        time_ids = torch.tensor([[*o, *c, *t] for o, c, t in zip(batch.original_sizes, batch.crop_top_lefts, batch.target_sizes)],
                                device=self.device, dtype=self.dtype)
        pred = self.unet(draw.noisy, draw.timesteps, encoder_hidden_states=text["prompt_embeds"].to(self.device),
                         added_cond_kwargs={"text_embeds": text["pooled_prompt_embeds"].to(self.device), "time_ids": time_ids},
                         return_dict=False)[0]
        return per_sample_mse(pred, draw.target) * draw.weight

    # ---- LoRA ----------------------------------------------------------------------------------
    def lora_components(self, transformer_only: bool, train_text_encoder: bool) -> dict[str, LoraTargets]:
        named = list(self.unet.named_modules())
        # add_embedding is left out: diffusers' kohya reader folds its two layers onto one name
        linear = [n for n, m in named if isinstance(m, torch.nn.Linear) and not n.startswith("add_embedding")
                  and (".attentions." in n or not transformer_only)]
        conv = [n for n, m in named if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
                and n.startswith(("down_blocks.", "mid_block.", "up_blocks."))]
        targets = {"unet": LoraTargets(self.unet, linear, conv)}
        if train_text_encoder:
            for key, te in zip(self.te_keys, self.text_encoders):
                names = [n for n, m in te.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(self.te_linears)]
                targets[key] = LoraTargets(te, names, [])
        return targets

    def lora_modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, **dict(zip(self.te_keys, self.text_encoders))}

    def file_prefix(self, key: str) -> str:
        # kohya names CLIP layers `text_model.encoder...`; transformers 5 dropped `text_model.` from CLIPTextModel
        module = self.lora_modules()[key]
        return FILE_PREFIXES[key] + ("_text_model" if key != "unet" and not hasattr(module, "text_model") else "")

    def lora_to_file(self, states):
        tensors = {}
        for key, state in states.items():
            alphas = {k[: -len(".alpha")]: float(v) for k, v in state.items() if k.endswith(".alpha")}
            weights = {k: v for k, v in state.items() if not k.endswith(".alpha")}
            tensors.update(to_kohya(weights, alphas, self.file_prefix(key)))
        return tensors

    def lora_from_file(self, tensors):
        states = {}
        for key, module in self.lora_modules().items():
            state, alphas = from_kohya(tensors, [n for n, _ in module.named_modules()], self.file_prefix(key))
            if state:
                states[key] = {**state, **{f"{m}.alpha": torch.tensor(a) for m, a in alphas.items()}}
        return states

    # ---- full fine-tune ----------------------------------------------------------------------------
    full_component = "unet"

    def full_to_file(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """An all-in-one checkpoint in SGM layout (ComfyUI's checkpoints/): the UNet (or its gathered `state`) with
        the VAE and the text encoders that are still loaded (they are freed after caching text embeddings)."""
        from .formats import diffusers_to_sgm

        parts = {"unet": state or self.unet.state_dict()}
        if self.vae is not None:
            parts["vae"] = self.vae.state_dict()
        parts.update({k: te.state_dict() for k, te in zip(("text_encoder", "text_encoder_2"), self.text_encoders)})
        return diffusers_to_sgm(parts)

    def save_full_diffusers(self, folder: Path, dtype) -> None:
        write_diffusers_folder(getattr(self, "components_root", None), folder, {"unet": self.unet})

    # ---- other layouts and merging (trainer lora convert / merge) ---------------------------------
    lora_layouts = ("kohya", "comfy", "diffusers")  # ComfyUI applies SDXL LoRAs fully in kohya's layout: the same
    # diffusers' prefix of each component's keys, which is also its folder
    DIFFUSERS_PREFIXES = {"unet": "unet.", "te1": "text_encoder.", "te2": "text_encoder_2."}

    @classmethod
    def unet_config(cls) -> dict:
        """The full-size UNet's config, whose module names LoRA files are read against."""
        from .formats import base_config

        return base_config("unet")

    @classmethod
    def lora_text_encoders(cls, root: Path | None = None) -> list[torch.nn.Module]:
        """The text encoders LoRA files may adapt, in `te_keys` order: `root`'s, or meta-device ones from the shipped
        SDXL configs (module names only)."""
        from .formats import base_config

        if root is not None:
            return [CLIPTextModel.from_pretrained(root, subfolder="text_encoder", local_files_only=True),
                    CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder_2", local_files_only=True)]
        with torch.device("meta"):
            return [CLIPTextModel(base_config("text_encoder")), CLIPTextModelWithProjection(base_config("text_encoder_2"))]

    @classmethod
    def _shell(cls, unet=None, text_encoders=None):
        """An instance holding only the modules (meta-device ones at full size unless given), for reading and writing
        LoRA files by module name."""
        shell = cls.__new__(cls)
        with torch.device("meta"):
            shell.unet = unet or UNet2DConditionModel.from_config(cls.unet_config())
        shell.text_encoders = cls.lora_text_encoders() if text_encoders is None else text_encoders
        return shell

    @classmethod
    def lora_read_any(cls, tensors: dict[str, torch.Tensor], shell=None) -> dict[str, dict[str, torch.Tensor]]:
        """Per-component peft-named state (with `.alpha`, DoRA as `.dora_scale`) of a file in kohya's or diffusers'
        layout; a key of no component this reads is an error naming it."""
        shell = shell or cls._shell()
        prefixes = tuple(cls.DIFFUSERS_PREFIXES[c] for c in shell.lora_modules())
        if not any(k.startswith(prefixes) for k in tensors):
            heads = tuple(shell.file_prefix(c) + "_" for c in shell.lora_modules())
            unread = [k for k in tensors if not k.startswith(heads)]
            if unread:  # from_kohya reads one prefix at a time and passes over the others
                raise ValueError(f"{unread[0]}: not a {cls.__name__} LoRA key ({', '.join(heads)} or {', '.join(prefixes)})")
            return shell.lora_from_file(tensors)
        states: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            component = next((c for c in shell.lora_modules() if key.startswith(cls.DIFFUSERS_PREFIXES[c])), None)
            if component is None:
                raise ValueError(f"{key}: not a {cls.__name__} LoRA key ({', '.join(prefixes)})")
            name = key[len(cls.DIFFUSERS_PREFIXES[component]):]
            if name.endswith(".lora_magnitude_vector"):  # peft's DoRA magnitude: (out,), conv (1, out, 1, 1)
                name = name[: -len(".lora_magnitude_vector")] + ".dora_scale"
                t = t.reshape(-1, 1, 1, 1) if t.dim() == 4 else t.reshape(-1, 1)
            states.setdefault(component, {})[name] = t
        for state in states.values():  # diffusers files carry the scale in lora_B: alpha = rank
            for key in [k for k in state if k.endswith(".lora_A.weight")]:
                state.setdefault(key[: -len(".lora_A.weight")] + ".alpha", torch.tensor(float(state[key].shape[0])))
        return states

    @classmethod
    def lora_to_layout(cls, tensors: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
        """kohya (ours; also what `comfy` means for SDXL) <-> diffusers (`unet.` / `text_encoder.` /
        `text_encoder_2.`, each module's alpha/rank folded into lora_B so that no alpha is needed, DoRA as peft's
        `lora_magnitude_vector`): the same weight updates either way."""
        shell = cls._shell()
        states = cls.lora_read_any(tensors, shell)
        if layout in ("kohya", "comfy"):
            return shell.lora_to_file(states)
        out = {}
        for component, state in states.items():
            prefix = cls.DIFFUSERS_PREFIXES[component]
            for key, t in state.items():
                if key.endswith(".alpha"):
                    continue
                if ".hada_" in key or ".lokr_" in key:
                    raise ValueError(f"{key}: diffusers reads LoRA and DoRA only; LoHa/LoKr files stay in kohya's layout")
                if key.endswith(".lora_B.weight"):
                    name = key[: -len(".lora_B.weight")]
                    r = state[f"{name}.lora_A.weight"].shape[0]
                    t = t * (float(state[f"{name}.alpha"]) / r if f"{name}.alpha" in state else 1.0)
                if key.endswith(".dora_scale"):
                    key = key[: -len(".dora_scale")] + ".lora_magnitude_vector"
                    t = t.reshape(1, -1, 1, 1) if t.dim() == 4 else t.reshape(-1)
                out[prefix + key] = t
        return out

    @classmethod
    def open_for_merge(cls, base: str):
        """trainer lora merge into a diffusers folder: (modules, write(output), read(tensors) -> states)."""
        from ..sources import resolve_model_source

        src = resolve_model_source(base, key="--base")
        if src.kind == "single_file":
            return cls._open_single_file_for_merge(src.path)
        root = Path(src.path)
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", local_files_only=True)
        shell = cls._shell(unet, cls.lora_text_encoders(root))

        def write(out: Path) -> None:
            write_diffusers_folder(root, out, {cls.DIFFUSERS_PREFIXES[key].rstrip("."): m for key, m in shell.lora_modules().items()})
        return shell.lora_modules(), write, lambda tensors: cls.lora_read_any(tensors, shell)

    @classmethod
    def _open_single_file_for_merge(cls, path: Path):
        """An SGM checkpoint: the UNet and text encoders as diffusers state dicts, merged into and written back in
        place of their SGM keys; everything else in the file (VAE, extra keys) is copied through untouched."""
        from safetensors.torch import save_file

        from .formats import PREFIXES, base_config, diffusers_to_sgm, infer_sdxl_unet_config, sgm_to_diffusers
        from ..sources import load_state_dict_file

        sd = load_state_dict_file(path)
        unet_config = infer_sdxl_unet_config(sd, reference=base_config("unet"))
        parts = sgm_to_diffusers({k: v for k, v in sd.items() if not k.startswith(PREFIXES["vae"])}, {"unet": unet_config})
        names = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}
        modules = {key: parts[name] for key, name in names.items() if name in parts}

        def write(out: Path) -> None:
            merged = dict(sd)
            merged.update(diffusers_to_sgm({names[key]: state for key, state in modules.items()}))
            save_file({k: v.contiguous() for k, v in merged.items()}, str(out))
        return modules, write, cls.lora_read_any

    def save_diffusers_lora(self, path, modules: dict[str, torch.nn.Module], dtype: torch.dtype) -> None:
        """The same LoRA in diffusers/peft layout (`unet.`, `text_encoder.`, ...), for diffusers' loader."""
        names = {"unet": "unet_lora", "te1": "text_encoder_lora", "te2": "text_encoder_2_lora", "te": "text_encoder_lora"}
        save_lora_with_diffusers(type(self.pipe), path, {names[k]: m for k, m in modules.items()}, dtype)

    # ---- previews ------------------------------------------------------------------------------
    def generate(self, request: SampleRequest):
        cls, extra = SAMPLERS[self.sample_cfg.sampler if self.sample_cfg else "euler"]
        self.pipe.scheduler = cls.from_config(self.pipe.scheduler.config, **extra,
                                              prediction_type=self.prediction_type)
        neg = request.neg_text or self.unconditional
        with torch.no_grad(), on_device(self.vae, self.device):
            return self.pipe(
                prompt_embeds=request.text["prompt_embeds"].to(self.device),
                pooled_prompt_embeds=request.text["pooled_prompt_embeds"].to(self.device),
                negative_prompt_embeds=neg.get("prompt_embeds"), negative_pooled_prompt_embeds=neg.get("pooled_prompt_embeds"),
                width=request.width, height=request.height, num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale, generator=torch.Generator(self.device).manual_seed(request.seed),
            ).images[0]
