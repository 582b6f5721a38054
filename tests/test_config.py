"""The config schema: ai-toolkit defaults, readable errors, substitutions, lookup, derived values."""
import json
import textwrap

import pytest
import yaml

from eridiffusion.config import ConfigError, load_config, parse_config, parse_prompt_flags, resolved_dict

MINIMAL = """
job: extension
config:
  name: my_lora
  process:
    - type: sd_trainer
      network: {type: lora, linear: 16, linear_alpha: 16}
      datasets: [{folder_path: /data/imgs}]
      model: {name_or_path: some/model}
      sample: {prompts: ["a photo"]}
"""

# ai-toolkit's config/examples/train_lora_flux_24gb.yaml, as described in the reference
FLUX_24GB = """
---
job: extension
config:
  name: "my_first_flux_lora_v1"
  process:
    - type: 'sd_trainer'
      training_folder: "output"
      device: cuda:0
      trigger_word: "p3r5on"
      network:
        type: "lora"
        linear: 16
        linear_alpha: 16
      save:
        dtype: float16
        save_every: 250
        max_step_saves_to_keep: 4
        push_to_hub: false
      datasets:
        - folder_path: "/path/to/images/folder"
          caption_ext: "txt"
          caption_dropout_rate: 0.05
          shuffle_tokens: false
          cache_latents_to_disk: true
          resolution: [ 512, 768, 1024 ]
      train:
        batch_size: 1
        steps: 2000
        gradient_accumulation_steps: 1
        train_unet: true
        train_text_encoder: false
        gradient_checkpointing: true
        noise_scheduler: "flowmatch"
        optimizer: "adamw8bit"
        lr: 1e-4
        # linear_timesteps: true
        ema_config:
          use_ema: true
          ema_decay: 0.99
        dtype: bf16
      model:
        name_or_path: "black-forest-labs/FLUX.1-dev"
        is_flux: true
        quantize: true
        # low_vram: true
      sample:
        sampler: "flowmatch"
        sample_every: 250
        width: 1024
        height: 1024
        prompts:
          - "woman with red hair, playing chess at the park, bomb going off in the background"
          - "a woman holding a coffee cup, in a beanie, sitting at a cafe"
          - "a horse is a DJ at a night club, fish eye lens, smoke machine, lazer lights, holding a martini"
          - "a man showing off his cool new t shirt at the beach, a shark is jumping out of the water in the background"
          - "a bear building a log cabin in the snow covered mountains"
          - "woman playing the guitar, on stage, singing a song, laser lights, punk rocker"
          - "hipster man with a beard, building a chair, in a wood shop"
          - "photo of a man, white background, medium shot, modeling clothing, studio lighting, white backdrop"
          - "a man holding a sign that says, 'this is a sign'"
          - "a bulldog, in a post apocalyptic world, with a shotgun, in a leather jacket, in a desert, with a motorcycle"
        neg: ""
        seed: 42
        walk_seed: true
        guidance_scale: 4
        sample_steps: 20
meta:
  name: "[name]"
  version: '1.0'
"""


def load_text(tmp_path, text, name="job.yaml", **kw):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return load_config(str(path), **kw)


def process(cfg):
    return cfg.config.process[0]


def error_of(tmp_path, text) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    return str(info.value)


def test_defaults_match_ai_toolkit(tmp_path):
    proc = process(load_text(tmp_path, MINIMAL))
    assert proc.name == "my_lora" and proc.training_folder == "output" and proc.device == "cuda:0"
    assert proc.train.lr == 1e-6 and proc.train.unet_lr == 1e-6 and proc.train.steps == 1000
    assert proc.train.gradient_checkpointing is True and proc.train.dtype == "fp32"
    assert proc.train.noise_scheduler == "ddpm" and proc.train.timestep_type == "sigmoid"
    assert proc.train.gradient_accumulation == 1 and proc.train.ema_config.use_ema is False
    assert proc.save.save_every == 1000 and proc.save.dtype == "float16" and proc.save.max_step_saves_to_keep == 5
    assert proc.sample.sample_every == 100 and proc.sample.sampler == "ddpm"
    assert (proc.sample.width, proc.sample.height, proc.sample.guidance_scale) == (512, 512, 7)
    ds = proc.datasets[0]
    assert ds.resolution == [512] and ds.caption_ext == ".txt" and ds.buckets is True and ds.batch_size == 1
    assert proc.logging.log_every == 100 and proc.model.arch_name == "sd1" and proc.model.dtype == "fp32"


def test_network_derived_values(tmp_path):
    text = MINIMAL.replace("{type: lora, linear: 16, linear_alpha: 16}", "{rank: 8, alpha: 4, conv: 2}")
    net = process(load_text(tmp_path, text)).network
    assert (net.linear, net.linear_alpha, net.conv, net.conv_alpha, net.transformer_only) == (8, 4.0, 2, 2, True)
    net = process(load_text(tmp_path, MINIMAL.replace("{type: lora, linear: 16, linear_alpha: 16}", "{}"))).network
    assert (net.type, net.linear, net.linear_alpha) == ("lora", 4, 1.0)
    assert process(load_text(tmp_path, MINIMAL.replace("      network: {type: lora, linear: 16, linear_alpha: 16}\n", ""))).network is None


def test_typo_names_path_and_suggests(tmp_path):
    message = error_of(tmp_path, MINIMAL + "      train: {lrr: 1e-4}\n")
    assert str(tmp_path / "job.yaml") in message
    assert "unknown key config.process[0].train.lrr — did you mean 'lr'?" in message


def test_typo_in_legacy_and_nested_sections(tmp_path):
    text = MINIMAL.replace("linear_alpha: 16}", "linear_alpha: 16, network_kwargs: {only_if_contain: [a]}}")
    assert "did you mean 'only_if_contains'?" in error_of(tmp_path, text)
    assert "unknown key config.process[0].datasets[0].caption_typ — did you mean 'caption_type'?" in error_of(
        tmp_path, MINIMAL.replace("{folder_path: /data/imgs}", "{folder_path: /d, caption_typ: txt}"))


def test_unsupported_value_errors_default_passes(tmp_path):
    message = error_of(tmp_path, MINIMAL + "      train: {loss_type: wavelet, noise_multiplier: 2.0}\n")
    assert ("not supported yet: config.process[0].train.loss_type = 'wavelet' "
            "(EriDiffusion supports only 'mse' for now; remove the key)") in message
    assert "not supported yet: config.process[0].train.noise_multiplier = 2.0" in message
    spelled_out = MINIMAL + "      train: {loss_type: mse, noise_multiplier: 1.0, linear_timesteps2: false}\n"
    assert process(load_text(tmp_path, spelled_out)).train.loss_type == "mse"
    assert "not supported yet: config.process[0].network.type = 'lorm'" in error_of(
        tmp_path, MINIMAL.replace("type: lora", "type: lorm"))
    lokr = process(load_text(tmp_path, MINIMAL.replace("type: lora", "type: lokr"))).network
    assert (lokr.linear, lokr.linear_alpha, lokr.lokr_factor) == (9999999999, 9999999999, -1)  # ai-toolkit's full rank
    locon = process(load_text(tmp_path, MINIMAL.replace("type: lora", "type: lycoris"))).network
    assert locon.type == "locon" and locon.conv == locon.linear
    assert process(load_text(tmp_path, MINIMAL.replace("type: lora", "type: lora, lokr_factor: -1"))).network.linear == 16


def test_unsupported_sections_and_types(tmp_path):
    assert "not supported yet: config.process[0].adapter = {'type': 'ip'}" in error_of(
        tmp_path, MINIMAL + "      adapter: {type: ip}\n")
    assert "not supported yet: config.process[0].type = 'concept_slider'" in error_of(
        tmp_path, MINIMAL.replace("type: sd_trainer", "type: concept_slider"))
    assert "not supported yet: job = 'train'" in error_of(tmp_path, MINIMAL.replace("job: extension", "job: train"))
    assert "not supported yet: config.process[0].save.dtype = 'float8'" in error_of(
        tmp_path, MINIMAL + "      save: {dtype: float8}\n")


def test_dtype_spellings_are_normalised(tmp_path):
    text = MINIMAL + "      train: {dtype: bfloat16}\n      save: {dtype: bf16}\n"
    proc = process(load_text(tmp_path, text.replace("{name_or_path: some/model}", "{name_or_path: m, vae_dtype: float}")))
    assert (proc.train.dtype, proc.save.dtype, proc.model.dtype, proc.model.vae_dtype, proc.model.te_dtype) == (
        "bf16", "bfloat16", "bf16", "fp32", None)  # unset te_dtype: the architecture uses train.dtype
    assert "unknown dtype 'int4'" in error_of(tmp_path, MINIMAL + "      train: {dtype: int4}\n")


def test_wrong_type_and_range(tmp_path):
    message = error_of(tmp_path, MINIMAL + "      train: {lr: -1, steps: many}\n")
    assert "config.process[0].train.lr: should be greater than 0, given -1" in message
    assert "config.process[0].train.steps:" in message and "'many'" in message
    assert "config.process[0].datasets[0].resolution[1]" in error_of(
        tmp_path, MINIMAL.replace("/data/imgs}", "/d, resolution: [512, 0]}"))


def test_required_keys(tmp_path):
    assert "config.process: " in error_of(tmp_path, "job: extension\nconfig: {name: x, process: []}\n")
    assert "config.name: required key missing" in error_of(tmp_path, MINIMAL.replace("  name: my_lora\n", ""))
    assert "job: required key missing" in error_of(tmp_path, MINIMAL.replace("job: extension\n", ""))


def test_scientific_floats_parse_as_floats(tmp_path):
    proc = process(load_text(tmp_path, MINIMAL + "      train: {lr: 1e-4, unet_lr: 5e-5, steps: 1E3}\n"))
    assert proc.train.lr == 1e-4 and isinstance(proc.train.lr, float)
    assert proc.train.unet_lr == 5e-5 and proc.train.text_encoder_lr == 1e-4 and proc.train.steps == 1000


def test_env_substitution(tmp_path, monkeypatch):
    monkeypatch.setenv("ERI_DATA", "/mnt/data")
    assert process(load_text(tmp_path, MINIMAL.replace("/data/imgs", "${ERI_DATA}/imgs"))).datasets[0].folder_path == "/mnt/data/imgs"
    monkeypatch.delenv("ERI_DATA")
    assert "ERI_DATA" in error_of(tmp_path, MINIMAL.replace("/data/imgs", "${ERI_DATA}/imgs"))


def test_name_substitution(tmp_path):
    text = MINIMAL.replace("/data/imgs", "'/data/[name]'") + "meta: {name: '[name]', tags: ['[name]-v1']}\n"
    cfg = load_text(tmp_path, text)
    assert process(cfg).datasets[0].folder_path == "/data/my_lora" and cfg.meta == {"name": "my_lora", "tags": ["my_lora-v1"]}
    cfg = load_text(tmp_path, text, name_override="other")
    assert cfg.config.name == "other" and process(cfg).name == "other" and cfg.meta["name"] == "other"


def test_lookup_in_config_folder(tmp_path, monkeypatch):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "flux_job.yml").write_text(MINIMAL)
    monkeypatch.chdir(tmp_path)
    assert load_config("flux_job").config.name == "my_lora"
    assert load_config("flux_job.yml").config.name == "my_lora"
    with pytest.raises(ConfigError, match=r"not found: nope .*config/nope\.yaml"):
        load_config("nope")


def test_json_config(tmp_path):
    data = yaml.safe_load(MINIMAL)
    path = tmp_path / "job.jsonc"
    path.write_text("// from the UI\n" + json.dumps(data))
    assert load_config(str(path)).config.name == "my_lora"


@pytest.mark.parametrize("model, arch, variant", [
    ("{name_or_path: m, arch: flex1}", "flux", None),
    ("{name_or_path: m, arch: 'wan21:14b'}", "wan21", "14b"),
    ("{name_or_path: m, is_flux: true}", "flux", None),
    ("{name_or_path: m, is_xl: true}", "sdxl", None),
    ("{name_or_path: m}", "sd1", None),
])
def test_arch_resolution(tmp_path, model, arch, variant):
    m = process(load_text(tmp_path, MINIMAL.replace("{name_or_path: some/model}", model))).model
    assert (m.arch_name, m.arch_variant) == (arch, variant)
    assert m.arch_alias == ("flex1" if "flex1" in model else None)


def test_legacy_gradient_accumulation_steps(tmp_path):
    assert process(load_text(tmp_path, MINIMAL + "      train: {gradient_accumulation_steps: 4}\n")).train.gradient_accumulation == 4
    assert "not supported yet: config.process[0].train.gradient_accumulation_steps = -1" in error_of(
        tmp_path, MINIMAL + "      train: {gradient_accumulation_steps: -1}\n")
    assert "disagree" in error_of(tmp_path, MINIMAL + "      train: {gradient_accumulation_steps: 4, gradient_accumulation: 2}\n")


def test_parse_prompt_flags():
    assert parse_prompt_flags("a cat --w 768 --h 512 --n blurry, ugly --seed 7 --cfg 3.5 --s 30 --m 0.5") == (
        "a cat", {"width": 768, "height": 512, "neg": "blurry, ugly", "seed": 7, "guidance_scale": 3.5,
                  "sample_steps": 30, "network_multiplier": 0.5})
    assert parse_prompt_flags("plain prompt") == ("plain prompt", {})
    assert parse_prompt_flags("a cat --ctrl_img x.png") == ("a cat", {"ctrl_img": "x.png"})  # image-to-video's start
    with pytest.raises(ConfigError, match="--ctrl_idx"):
        parse_prompt_flags("a cat --ctrl_idx 1")
    with pytest.raises(ConfigError, match="expects int"):
        parse_prompt_flags("a cat --w wide")


def test_samples_from_prompts_with_flags(tmp_path):
    text = MINIMAL.replace('{prompts: ["a photo"]}', '{seed: 10, walk_seed: true, width: 1024, '
                           'prompts: ["a photo --w 768 --d 3", "[trigger] dog --l 2"]}')
    sample = process(load_text(tmp_path, text)).sample
    first, second = sample.samples
    assert (first.prompt, first.width, first.height, first.seed) == ("a photo", 768, 512, 3)
    assert (second.prompt, second.width, second.seed, second.guidance_scale, second.sample_steps) == ("[trigger] dog", 1024, 11, 2.0, 20)
    message = error_of(tmp_path, MINIMAL.replace('"a photo"', '"a photo --ctrl_idx 1"'))
    assert "config.process[0].sample.samples[0]" in message and "--ctrl_idx" in message
    clip = process(load_text(tmp_path, MINIMAL.replace('{prompts: ["a photo"]}', '{fps: 12, prompts: ["a photo --frames 9"]}')))
    assert (clip.sample.samples[0].num_frames, clip.sample.samples[0].fps) == (9, 12)


def test_resolved_dict_round_trips(tmp_path):
    cfg = load_text(tmp_path, FLUX_24GB)
    data = resolved_dict(cfg)
    assert data["config"]["process"][0]["train"]["lr"] == 1e-4 and data["config"]["process"][0]["sample"]["prompts"] == []
    again = load_text(tmp_path, yaml.safe_dump(data, sort_keys=False), name="config.yaml")
    assert resolved_dict(again) == data


def test_ai_toolkit_flux_24gb_example(tmp_path):
    cfg = load_text(tmp_path, FLUX_24GB)
    proc = process(cfg)
    assert proc.model.quantize and proc.model.quantize_te and proc.model.qtype == "qfloat8"
    assert cfg.job == "extension" and proc.name == "my_first_flux_lora_v1" and proc.trigger_word == "p3r5on"
    assert (proc.network.type, proc.network.linear, proc.network.linear_alpha) == ("lora", 16, 16.0)
    assert (proc.save.dtype, proc.save.save_every, proc.save.max_step_saves_to_keep) == ("float16", 250, 4)
    ds = proc.datasets[0]
    assert ds.caption_ext == ".txt" and ds.caption_dropout_rate == 0.05 and ds.cache_latents_to_disk
    assert ds.resolution == [512, 768, 1024] and ds.trigger_word == "p3r5on"
    t = proc.train
    assert (t.batch_size, t.steps, t.gradient_accumulation, t.optimizer, t.lr, t.dtype) == (1, 2000, 1, "adamw8bit", 1e-4, "bf16")
    assert t.noise_scheduler == "flowmatch" and t.ema_config.use_ema and t.ema_config.ema_decay == 0.99
    assert proc.model.arch_name == "flux" and proc.model.dtype == "bf16"
    s = proc.sample
    assert (s.sampler, s.sample_every, s.guidance_scale, s.sample_steps) == ("flowmatch", 250, 4, 20)
    assert len(s.samples) == 10 and [x.seed for x in s.samples] == list(range(42, 52))
    assert all((x.width, x.height, x.neg) == (1024, 1024, "") for x in s.samples)
    assert cfg.meta == {"name": "my_first_flux_lora_v1", "version": "1.0"}


def test_quantize_keys(tmp_path):
    cfg = {"job": "extension", "config": {"name": "q", "process": [{
        "type": "sd_trainer", "datasets": [{"folder_path": "x"}],
        "model": {"name_or_path": "m", "quantize": True, "qtype": "uint3", "quantize_kwargs": {"exclud": ["a"]}}}]}}
    with pytest.raises(ConfigError) as info:
        parse_config(cfg)
    message = str(info.value)
    assert "model.qtype = 'uint3'" in message and "nf4" in message
    assert "quantize_kwargs.exclud" in message and "exclude" in message
    cfg["config"]["process"][0]["model"].update(qtype="QINT8", quantize_kwargs={"exclude": ["*time_text_embed*"]})
    model = parse_config(cfg).config.process[0].model
    assert model.qtype == "qint8" and model.quantize_te and model.quantize_kwargs.exclude == ["*time_text_embed*"]
